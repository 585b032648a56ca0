"""Feature caching across denoising steps for the translation engine.

The method is DeepCache (Ma, Fang and Wang, "DeepCache: Accelerating Diffusion Models for
Free", CVPR 2024, arXiv:2312.00858). A UNet's deep features change little from one denoising
step to the next, while its outermost skip branch carries the detail that does change. With
``cache_interval`` N > 1, every N-th step of a job runs the whole UNet and keeps the deep
features: the input of the last up block's last resnet, less the outermost skip connection.
The steps between run the outermost branch alone (time embedding, ``conv_in``, that resnet and
its attention, the output head) on the kept features, so everything deeper is skipped. This is
the paper's shallowest branch (the authors' ``cache_branch_id=0``) with its uniform schedule.

The schedule belongs to each job, not to the batch: a job runs full at its own steps 0, N, 2N...
counted from the grid index where it starts. So a job that has just joined a strength sweep
runs full at once and never reads another job's features, and each image depends only on its
job and the setting the record names, not on the other jobs of the sweep. At a grid index the
engine calls the UNet once for the jobs at a full step and once for the rest (:func:`step_groups`).

The PyPI package ``DeepCache`` (0.1.1) was not used: its helper counts steps on
``pipe.scheduler`` (the engine gives each job its own scheduler) and keeps one cache per module
for the whole batch, so in a sweep it either never skips or concatenates features of a batch
with a different number of jobs (docs/fastpath.md).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

PLAIN, FULL, SHALLOW = "plain", "full", "shallow"   # the UNet call of a group of jobs at one grid index


def check_cacheable(unet) -> None:
    """ValueError unless the UNet has the Stable Diffusion 1.x/2.x layout the shallow path runs
    (no class or added embeddings, a last up block without upsampler, one attention per resnet if any)."""
    cfg = unet.config
    last = unet.up_blocks[-1]
    attentions = getattr(last, "attentions", None)
    problems = [name for name, bad in (
        ("class embeddings", cfg.class_embed_type is not None or cfg.num_class_embeds is not None),
        ("added embeddings", cfg.addition_embed_type is not None),
        ("timestep conditioning", cfg.time_cond_proj_dim is not None),
        ("encoder projection", cfg.encoder_hid_dim_type is not None),
        ("centred input", bool(cfg.center_input_sample)),
        ("an upsampler in the last up block", getattr(last, "upsamplers", None) is not None),
        ("attentions that do not pair with resnets", attentions is not None and len(attentions) != len(last.resnets)),
    ) if bad]
    if problems:
        raise ValueError(f"cache_interval > 1 needs a Stable Diffusion 1.x/2.x UNet; this one has "
                         f"{', '.join(problems)}. Use --cache-interval 1")


def is_full_step(k: int, start: int, interval: int) -> bool:
    """Whether a job that starts at grid index ``start`` runs the whole UNet at index ``k``.

    >>> [is_full_step(k, 2, 3) for k in range(2, 9)]
    [True, False, False, True, False, False, True]
    """
    return (k - start) % interval == 0


def step_groups(states: Sequence, k: int, interval: int) -> list[tuple[str, list]]:
    """The UNet calls at grid index ``k``: [(mode, jobs)], empty groups left out.

    ``interval`` 1: one PLAIN group (the UNet as without caching). Otherwise FULL for the jobs at
    a full step of their own schedule (or without features yet) and SHALLOW for the others.
    """
    if interval == 1:
        return [(PLAIN, list(states))]
    groups: dict[str, list] = {FULL: [], SHALLOW: []}
    for st in states:
        groups[FULL if st.deep is None or is_full_step(k, st.start, interval) else SHALLOW].append(st)
    return [(mode, group) for mode, group in groups.items() if group]


def unet_call(unet, chunk: Sequence, mode: str, latents: torch.Tensor, t, text: torch.Tensor) -> torch.Tensor:
    """The noise prediction for ``latents`` (rows: the jobs of ``chunk``, repeated per guidance
    half), as ``mode`` says; FULL keeps each job's deep features on it (``st.deep``)."""
    if mode == PLAIN:
        return unet(latents, t, encoder_hidden_states=text, return_dict=False)[0]
    if mode == FULL:
        noise, deep = full_with_features(unet, latents, t, text)
        halves = deep.shape[0] // len(chunk)
        for i, st in enumerate(chunk):
            st.deep = deep[[i + h * len(chunk) for h in range(halves)]]   # this job's rows, a copy
        return noise
    halves = latents.shape[0] // len(chunk)
    deep = torch.cat([st.deep[h : h + 1] for h in range(halves) for st in chunk])
    return shallow(unet, latents, t, text, deep)


def full_with_features(unet, latents: torch.Tensor, t, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole UNet's output (the same call as without caching) and the deep features: the
    input of the last up block's last resnet without the channels of the outermost skip."""
    kept: dict[str, torch.Tensor] = {}
    skip = unet.conv_in.out_channels

    def keep(module, args):
        hidden = args[0]
        kept["deep"] = hidden[:, : hidden.shape[1] - skip]

    handle = unet.up_blocks[-1].resnets[-1].register_forward_pre_hook(keep)
    try:
        noise = unet(latents, t, encoder_hidden_states=text, return_dict=False)[0]
    finally:
        handle.remove()
    return noise, kept["deep"]


def shallow(unet, latents: torch.Tensor, t, text: torch.Tensor, deep: torch.Tensor) -> torch.Tensor:
    """The outermost branch of the UNet on kept deep features: the steps of
    UNet2DConditionModel.forward that this branch needs, in the same order."""
    emb = unet.time_embedding(unet.get_time_embed(sample=latents, timestep=t), None)
    if unet.time_embed_act is not None:
        emb = unet.time_embed_act(emb)
    block = unet.up_blocks[-1]
    hidden = block.resnets[-1](torch.cat([deep, unet.conv_in(latents)], dim=1), emb)
    if getattr(block, "attentions", None):
        hidden = block.attentions[-1](hidden, encoder_hidden_states=text, return_dict=False)[0]
    if unet.conv_norm_out is not None:
        hidden = unet.conv_act(unet.conv_norm_out(hidden))
    return unet.conv_out(hidden)


def release(states: Sequence) -> None:
    """Drop the kept features of finished jobs."""
    for st in states:
        st.deep = None
