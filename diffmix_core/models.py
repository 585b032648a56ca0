"""Loading base pipelines (Hub id or local folder), the offline CLIP tokenizer,
tiny SD-architecture pipelines for tests and offline use, and random-weight
pipelines of the real architectures (SD 1.5, 2.1, 2.1-base; configs as data in
``archs/``) for checking a machine without downloading weights.

Every stage gets its pipeline from :func:`load_pipeline`; nothing else in the
library constructs one from a name. A stage that runs on a bundle calls
``apply.load_pipeline_for``, the one place that resolves the base model from the
bundle (:func:`pipeline_source`), loads it and applies the bundle's adapters.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import os
from pathlib import Path

import torch

from .config import PipelineConfig

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16,
          "float16": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}

# Where derived offline files (the converted tokenizer, the tiny pipeline) are kept.
CACHE_DIR = Path(os.environ.get("DIFFMIX_CACHE", Path.home() / ".cache" / "diffmix"))


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    """Map 'fp16' / 'bf16' / 'fp32' (or a torch dtype) to a torch dtype."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[str(dtype).lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(set(DTYPES))}") from None


def load_weights_only(path: str | os.PathLike):
    """``torch.load`` with ``weights_only=True``: tensors and plain containers, never code.

    The one place the package reads a torch pickle (authors' checkpoints, timm .pth files).
    Anything else — a pickle that would run code, or junk — is a ValueError saying so.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # UnpicklingError for code, others for junk
        first = str(err).splitlines()[0] if str(err) else ""
        raise ValueError(f"{path} is not a plain weights file: torch.load(weights_only=True) refused it "
                         f"({type(err).__name__}: {first}). diffmix never runs pickled code; re-save it with "
                         "plain tensors and dicts, or as .safetensors.") from None


def default_device() -> str:
    """'cuda' when a GPU is visible, else 'cpu'."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def model_identity(pipe) -> dict:
    """{'model': id or resolved local path, 'revision': ...} of a loaded pipeline
    ('' for one built in memory)."""
    base = getattr(pipe, "diffmix_base", None)
    if base is None:
        base = {"model": normalise_model_id(pipe.config.get("_name_or_path", "") or ""), "revision": None}
    return dict(base)


def normalise_model_id(name: str | os.PathLike) -> str:
    """Local folders compare by resolved path; Hub ids as written."""
    name = str(name)
    if name and Path(name).is_dir():
        return str(Path(name).resolve())
    return name


def load_pipeline(
    model: str | os.PathLike,
    *,
    revision: str | None = None,
    dtype: str | torch.dtype | None = None,
    device: str | None = None,
    scheduler: str = PipelineConfig.scheduler,
    local_files_only: bool | None = None,
    channels_last: bool = False,
):
    """Load a Stable-Diffusion (1.x/2.x architecture) img2img pipeline.

    Args:
        model: a Hub id (``stable-diffusion-v1-5/stable-diffusion-v1-5``) or a local
            diffusers folder (as written by ``save_pretrained``).
        revision: Hub revision (branch, tag or commit); ignored for folders.
        dtype: 'fp16', 'bf16' or 'fp32' (default fp32 on CPU, fp16 on CUDA).
        device: 'cuda', 'cpu', ... (default: CUDA when present).
        scheduler: 'dpm++' (DPM-Solver++ multistep, the paper's), 'ddim' or 'native'.
        local_files_only: never touch the network (default: True for folders and
            when ``HF_HUB_OFFLINE`` is set).
        channels_last: UNet and VAE in channels-last memory format (faster convolutions on
            recent GPUs). Attention is PyTorch SDPA, diffusers' default.

    Returns:
        A ``StableDiffusionImg2ImgPipeline`` with the safety checker off.
    """
    from diffusers import StableDiffusionImg2ImgPipeline

    device = device or default_device()
    if dtype is None:
        dtype = torch.float16 if device.startswith("cuda") else torch.float32
    dtype = resolve_dtype(dtype)
    is_dir = Path(model).is_dir()
    if not is_dir and (Path(model).exists() or str(model).startswith((".", "/", "~"))):
        raise FileNotFoundError(f"base model folder {model} does not exist or is not a diffusers folder")
    if local_files_only is None:
        local_files_only = is_dir or os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0")
    if is_dir and not (Path(model) / "model_index.json").exists():
        raise FileNotFoundError(f"{model} has no model_index.json: not a diffusers pipeline folder")
    if is_dir:
        refuse_pickled_weights(Path(model))
    try:
        pipe = StableDiffusionImg2ImgPipeline.from_pretrained(
            str(model), revision=None if is_dir else revision, dtype=dtype,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
            local_files_only=local_files_only, use_safetensors=True,   # never a pickled .bin fallback
        )
    except OSError as err:
        raise FileNotFoundError(
            f"could not load base model {model!r}: {err}. Give a local diffusers folder, or a Hub id "
            "with network access (set HF_HOME to reuse a cache)."
        ) from err
    # What the bundle check compares against (see apply.check_base).
    pipe.diffmix_base = {"model": normalise_model_id(model), "revision": None if is_dir else revision}
    # A folder of random weights (random_pipeline_dir) says so; the CLI and the app show it.
    pipe.diffmix_random = random_weights_info(model) if is_dir else None
    set_scheduler(pipe, scheduler)
    pipe.set_progress_bar_config(disable=True)
    pipe = pipe.to(device)
    if channels_last:
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
    return pipe


def pipeline_source(config: PipelineConfig, bundle=None) -> tuple[str, str | None]:
    """(model, revision) to load: ``config.model`` at ``config.revision``; with no model, the
    bundle's base model at the bundle's revision (``config.revision`` overrides it)."""
    if config.model:
        return config.model, config.revision
    if bundle is None:
        raise ValueError("no base model: give a base model (--base) or a bundle")
    return bundle.base_model, config.revision or bundle.base_revision


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


def refuse_pickled_weights(folder: Path) -> None:
    """ValueError when a component folder of a diffusers pipeline holds weights only as
    pickles (.bin, .pt, .ckpt ...): loading them could run code, so only .safetensors load."""
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        pickles = sorted(f.name for f in sub.iterdir() if f.suffix.lower() in PICKLE_SUFFIXES)
        if pickles and not any(f.suffix == ".safetensors" for f in sub.iterdir()):
            raise ValueError(f"base model {folder}: {sub.name}/ holds only pickled weights ({', '.join(pickles[:3])}); "
                             "diffmix loads .safetensors only (a pickle can run code). Convert them, e.g. "
                             "save_pretrained(..., safe_serialization=True) on a machine you trust")


def set_scheduler(pipe, name: str) -> None:
    """Swap the pipeline's scheduler, keeping its noise schedule."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    if name == "native":
        return
    classes = {"dpm++": DPMSolverMultistepScheduler, "ddim": DDIMScheduler}
    if name not in classes:
        raise ValueError(f"unknown scheduler {name!r}; use one of {sorted(classes) + ['native']}")
    # Stable Diffusion's pipelines force clip_sample off for DDIM (latents are not in [-1, 1]).
    extra = {"clip_sample": False} if name == "ddim" else {}
    pipe.scheduler = classes[name].from_config(pipe.scheduler.config, **extra)


def scheduler_name(scheduler) -> str:
    """A short name for records: 'dpm++', 'ddim', or the class name."""
    return {"DPMSolverMultistepScheduler": "dpm++", "DDIMScheduler": "ddim"}.get(
        type(scheduler).__name__, type(scheduler).__name__)


# --------------------------------------------------------------------------- tokenizer
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP reversible byte -> unicode table (same as open_clip's)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def write_clip_tokenizer_files(out_dir: str | os.PathLike) -> Path:
    """Convert open_clip's shipped BPE table into the vocab.json + merges.txt that
    transformers' CLIPTokenizer reads. Ids equal OpenAI CLIP's (49,408 tokens)."""
    import open_clip

    bpe = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    lines = gzip.open(bpe).read().decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    vocab = list(_bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return out


def clip_tokenizer(cache_dir: str | os.PathLike | None = None, *, pad_token: str = "<|endoftext|>",
                   model_max_length: int = 77):
    """The real CLIP BPE tokenizer, built offline. SD 1.x pads with '<|endoftext|>';
    SD 2.x (OpenCLIP's text tower, same BPE) pads with '!'."""
    from transformers import CLIPTokenizer

    folder = Path(cache_dir or CACHE_DIR / "clip-tokenizer")
    if not (folder / "merges.txt").exists():
        write_clip_tokenizer_files(folder)
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"),
                         model_max_length=model_max_length, pad_token=pad_token)


# --------------------------------------------------------------------------- tiny pipelines
def build_tiny_pipeline(seed: int = 0, width: int = 32, sample_size: int = 32):
    """A randomly initialised SD-architecture pipeline, small enough for CPU tests.

    Same classes as Stable Diffusion 1.x (AutoencoderKL, UNet2DConditionModel,
    CLIPTextModel, the real CLIP tokenizer, DPM-Solver++), so every code path of
    the real thing runs; the images are noise-like because the weights are random.

    Args:
        seed: weight initialisation seed.
        width: base channel count (UNet blocks are width, 2*width).
        sample_size: image resolution in pixels (the VAE downsamples by 2).
    """
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, StableDiffusionImg2ImgPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    tokenizer = clip_tokenizer()
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
        pad_token_id=49407, projection_dim=width))
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(width // 2, width),
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1, norm_num_groups=8, sample_size=sample_size)
    unet = UNet2DConditionModel(
        sample_size=sample_size // 2, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(width, 2 * width), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=width,
        attention_head_dim=2, norm_num_groups=8)
    scheduler = DPMSolverMultistepScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
        steps_offset=1, timestep_spacing="leading", algorithm_type="dpmsolver++", solver_order=2)
    pipe = StableDiffusionImg2ImgPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_pipeline_dir(root: str | os.PathLike | None = None, seed: int = 0) -> Path:
    """Build (once) and save a tiny pipeline folder; returns its path."""
    folder = Path(root or CACHE_DIR / f"tiny-sd-{seed}")
    if not (folder / "model_index.json").exists():
        tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
        build_tiny_pipeline(seed).save_pretrained(tmp)
        if not (folder / "model_index.json").exists():
            if folder.exists():
                import shutil
                shutil.rmtree(folder)
            tmp.rename(folder)
    return folder


# --------------------------------------------------------------------------- real architectures, random weights
ARCHS_DIR = Path(__file__).parent / "archs"
# Written into every random-weight pipeline folder; load_pipeline reads it and labels the pipeline.
RANDOM_MARKER = "diffmix_random.json"


def arch_names() -> list[str]:
    """The shipped architectures: ['sd15', 'sd21', 'sd21-base']."""
    return sorted(p.stem for p in ARCHS_DIR.glob("*.json"))


def load_arch(arch: str | os.PathLike) -> dict:
    """An architecture as data: a shipped name ('sd15', 'sd21', 'sd21-base') or a JSON file of the
    same form (keys unet, vae, text_encoder, tokenizer, scheduler: each component's config)."""
    path = ARCHS_DIR / f"{arch}.json" if str(arch) in arch_names() else Path(arch)
    if not path.is_file():
        raise ValueError(f"unknown architecture {str(arch)!r}; use one of {arch_names()} or a JSON file "
                         "with the keys unet, vae, text_encoder, tokenizer, scheduler")
    spec = json.loads(path.read_text())
    missing = [k for k in ("unet", "vae", "text_encoder", "tokenizer", "scheduler") if k not in spec]
    if missing:
        raise ValueError(f"architecture file {path} lacks {missing}")
    spec.setdefault("name", path.stem)
    return spec


def build_random_pipeline(arch: str | os.PathLike | dict, seed: int = 0, dtype: str | torch.dtype | None = None,
                          device: str = "cpu"):
    """A pipeline of a real architecture with RANDOM weights (``torch.manual_seed(seed)`` init).

    Shapes, parameter names, memory and speed are the real model's; its images are noise.
    ``device``: where the weights are made (initialising 860 M parameters on a GPU takes a
    second; the values then differ from a CPU build with the same seed).
    """
    import diffusers
    from diffusers import AutoencoderKL, StableDiffusionImg2ImgPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    spec = arch if isinstance(arch, dict) else load_arch(arch)
    torch.manual_seed(seed)
    tok = spec["tokenizer"]
    tokenizer = clip_tokenizer(pad_token=tok["pad_token"], model_max_length=tok["model_max_length"])
    text_cfg = {k: v for k, v in spec["text_encoder"].items() if k not in ("architectures", "model_type")}
    with torch.device(device):
        text_encoder = CLIPTextModel(CLIPTextConfig(**text_cfg))
        vae = AutoencoderKL.from_config(spec["vae"])
        unet = UNet2DConditionModel.from_config(spec["unet"])
    scheduler = getattr(diffusers, spec["scheduler"]["_class_name"]).from_config(spec["scheduler"])
    pipe = StableDiffusionImg2ImgPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    # .half()/.bfloat16() rather than .to(dtype): diffusers' ModelMixin.to warns on every cast.
    cast = {torch.float16: "half", torch.bfloat16: "bfloat16", torch.float32: "float"}[resolve_dtype(dtype)]
    for module in (text_encoder, vae, unet):
        getattr(module, cast)()
    return pipe


def random_pipeline_name(arch: str | os.PathLike, seed: int = 0, dtype: str | torch.dtype = "fp16") -> str:
    """'random-sd15-fp16-<hash>': the folder name of a random-weight pipeline; the hash covers the
    architecture data and the seed, so a changed architecture file never reuses a stale folder."""
    spec = load_arch(arch)
    digest = hashlib.sha256(json.dumps([spec, seed], sort_keys=True).encode()).hexdigest()[:8]
    return f"random-{spec['name']}-{_dtype_name(dtype)}-{digest}"


def _dtype_name(dtype: str | torch.dtype) -> str:
    return {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}[resolve_dtype(dtype)]


def random_pipeline_dir(arch: str | os.PathLike, folder: str | os.PathLike | None = None, *, seed: int = 0,
                        dtype: str | torch.dtype = "fp16") -> Path:
    """Build (once) and save a random-weight pipeline of ``arch``; returns the folder.

    The folder (default: the cache's :func:`random_pipeline_name`) carries a README and
    ``diffmix_random.json`` that say the weights are random; load it with :func:`load_pipeline`.
    Weights are stored in ``dtype`` (fp16 halves the disk: 2 GB for SD 1.5) and load in any dtype.
    """
    spec = load_arch(arch)
    short = _dtype_name(dtype)
    folder = Path(folder or CACHE_DIR / random_pipeline_name(arch, seed, dtype))
    if (folder / RANDOM_MARKER).exists():
        return folder
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    pipe = build_random_pipeline(spec, seed, short)
    pipe.save_pretrained(tmp)
    del pipe
    info = {"random_weights": True, "arch": spec["name"], "seed": seed, "dtype": short,
            "architecture_of": spec.get("reference"), "description": spec.get("description"),
            "note": "RANDOM weights: the real architecture for checking shapes, memory and speed; images are noise."}
    (tmp / "README.md").write_text(
        f"# random-{spec['name']}: RANDOM WEIGHTS\n\nThe architecture of {spec.get('reference')} "
        f"({spec.get('description')}) with randomly initialised weights (seed {seed}, {short}), written by "
        "diffmix for `diffmix selftest` and `benchmarks/gpu.py`. Shapes, parameter names, memory and speed are "
        "the real model's; its images are noise. Not a model: never train or publish from it.\n")
    (tmp / RANDOM_MARKER).write_text(json.dumps(info, indent=1) + "\n")
    if folder.exists():
        import shutil
        shutil.rmtree(folder)
    tmp.rename(folder)
    return folder


def random_weights_info(model: str | os.PathLike) -> dict | None:
    """The random-weights marker of a pipeline folder (None for a real model or a Hub id)."""
    marker = Path(model) / RANDOM_MARKER
    if not marker.is_file():
        return None
    return json.loads(marker.read_text())
