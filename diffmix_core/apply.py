"""Put a bundle on a diffusers pipeline (its class tokens and UNet LoRA) and take it off.

1. :func:`check_base`: the pipeline is the base model the bundle was trained on;
2. the weights are read and re-verified (``Bundle.weights``) and checked against the
   pipeline (embedding width, free tokens, LoRA shapes) before anything is touched,
   so a bundle that fails leaves the pipeline as it was;
3. :func:`apply_bundle` loads them through diffusers (``load_textual_inversion``,
   ``load_lora_weights``); :func:`unload_bundle` restores the base exactly;
   :func:`set_lora_enabled` switches the LoRA off for the ti-* strategies;
4. :func:`load_pipeline_for`: the pipeline a stage runs on, its base resolved from the
   bundle and the bundle applied.
"""
from __future__ import annotations

import warnings

import torch

from .bundle import LORA_FILE, Bundle
from .config import PipelineConfig
from .models import load_pipeline, model_identity, normalise_model_id, pipeline_source
from .weights import check_lora_fits


def check_base(pipe, bundle: Bundle, allow_mismatch: bool = False) -> None:
    """ValueError unless ``pipe`` is the base model the bundle was trained on.

    Local folders compare by resolved path; revisions compare only when both are known.
    With ``allow_mismatch`` a mismatch only warns.
    """
    have = model_identity(pipe)
    have_model = normalise_model_id(have.get("model") or "")
    want_model = normalise_model_id(bundle.base_model)
    revs = (have.get("revision"), bundle.base_revision)
    same = have_model == want_model and (None in revs or revs[0] == revs[1])
    if same:
        return
    msg = (f"bundle {bundle.path} was trained on {want_model or '<unknown>'}"
           f"{'@' + revs[1] if revs[1] else ''} but the pipeline is {have_model or '<built in memory>'}"
           f"{'@' + revs[0] if revs[0] else ''}")
    if allow_mismatch:
        warnings.warn(msg + "; applying anyway (allow_base_mismatch)", stacklevel=3)
        return
    raise ValueError(msg + ". Load that base model, or pass allow_base_mismatch=True "
                     "(CLI: --allow-base-mismatch) to apply it anyway.")


def _check_fits(pipe, bundle: Bundle, vectors: list[torch.Tensor], lora: dict | None) -> None:
    """Everything apply_bundle needs to hold, checked before the pipeline is touched."""
    width = pipe.text_encoder.get_input_embeddings().weight.shape[1]
    if vectors[0].shape[0] != width:
        raise ValueError(f"bundle {bundle.path}: embedding width {vectors[0].shape[0]} != the text encoder's "
                         f"hidden size {width}; the bundle was made for another base model")
    current = getattr(pipe, "diffmix_bundle", None)
    leaving = set(current.tokens) if current is not None else set()
    vocab = pipe.tokenizer.get_vocab()
    taken = [t for t in bundle.tokens if t in vocab and t not in leaving]
    if taken:
        raise ValueError(f"token(s) {taken[:5]} are already in the tokenizer's vocabulary; unload the adapter "
                         "that added them or rename the bundle's tokens")
    if lora is not None:
        check_lora_fits(pipe.unet, lora)


def apply_bundle(pipe, bundle: Bundle, *, allow_base_mismatch: bool = False, adapter_name: str = "diffmix") -> None:
    """Load the bundle's class tokens and UNet LoRA into ``pipe``.

    All checks (base model, embedding width, free tokens, LoRA shapes) run first, so
    a bundle that fails them leaves the pipeline unchanged. Applying the bundle that is
    already applied does nothing; applying another first unloads the current one.
    The applied bundle is recorded as ``pipe.diffmix_bundle`` (None when none is).
    """
    if getattr(pipe, "diffmix_bundle", None) == bundle and getattr(pipe, "diffmix_adapter_name", None) == adapter_name:
        return
    check_base(pipe, bundle, allow_mismatch=allow_base_mismatch)
    vectors, lora = bundle.weights()
    _check_fits(pipe, bundle, vectors, lora)
    unload_bundle(pipe)
    had_lora = any(pipe.get_list_adapters().values())
    pipe.load_textual_inversion(vectors, token=list(bundle.tokens))
    if lora is not None:
        try:
            pipe.load_lora_weights(str(bundle.path), weight_name=LORA_FILE, adapter_name=adapter_name)
        except Exception:  # past the checks this is unexpected; leave the base, not half a bundle
            pipe.unload_textual_inversion(list(bundle.tokens))
            if not had_lora:
                pipe.unload_lora_weights()
            raise
    pipe.diffmix_bundle = bundle
    pipe.diffmix_adapter_name = adapter_name


def unload_bundle(pipe) -> None:
    """Remove the applied bundle's tokens and LoRA; the base model is restored exactly."""
    bundle = getattr(pipe, "diffmix_bundle", None)
    if bundle is None:
        return
    pipe.unload_textual_inversion(list(bundle.tokens))
    if bundle.lora_file is not None:
        pipe.unload_lora_weights()
    pipe.diffmix_bundle = None
    pipe.diffmix_adapter_name = None


def set_lora_enabled(pipe, enabled: bool) -> None:
    """Switch the UNet LoRA on or off without unloading it (ti-* strategies use the
    tokens alone). A no-op when no LoRA is loaded."""
    if enabled:
        pipe.unet.enable_lora()
    else:
        pipe.unet.disable_lora()


def load_pipeline_for(config: PipelineConfig, bundle=None, *, apply: bool = True,
                      allow_base_mismatch: bool = False):
    """The pipeline a stage runs on: resolve the base (:func:`pipeline_source`), load it, and
    (``apply``) check the bundle against it and load the bundle's tokens and LoRA.

    ``apply=False`` loads the bundle's base alone (``translate`` applies the bundle per call,
    e.g. on the app's shared pipeline). A base other than the bundle's is refused unless
    ``allow_base_mismatch`` (apply.check_base).
    """
    model, revision = pipeline_source(config, bundle)
    pipe = load_pipeline(model, revision=revision, dtype=config.dtype, device=config.device,
                         scheduler=config.scheduler)
    if bundle is not None and apply:
        apply_bundle(pipe, bundle, allow_base_mismatch=allow_base_mismatch)
    return pipe
