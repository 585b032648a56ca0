"""Soft labels for translated images (docs/method.md §3).

For a translation from class i to class j that ran strength s:
    y = k * ((1 - s**gamma) * onehot(i) + s**gamma * onehot(j))
s is the strength that actually ran (floor(N*s)/N for N scheduler steps), not
the one asked for: with 25 steps, s = 0.7 runs 17 steps, i.e. s = 0.68.

k, the label's total mass, defaults to :data:`LABEL_SCALE` = 1.0 everywhere: at translation
(the record's ``soft_label``), in the export and in training (classify.py), so the label an
image is recorded with is the label it is trained on. It is the value of the authors'
paper-era training script (commit a395a02) and of their long-tail runs; their later loaders
use 0.9. k stays an explicit setting (``--label-scale``) and is recorded with every image
(``label_scale``) and every training run.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

LABEL_SCALE = 1.0   # k by default (the decision above: the paper-era training script's value)


def steps_run(num_inference_steps: int, strength: float) -> int:
    """Denoising steps an img2img run at ``strength`` performs (diffusers' rule)."""
    return min(int(num_inference_steps * strength), num_inference_steps)


def effective_strength(num_inference_steps: int, strength: float) -> float:
    """The strength that actually runs: floor(N*s)/N."""
    return steps_run(num_inference_steps, strength) / num_inference_steps


def soft_label(source_class: str, target_class: str, strength: float,
               gamma: float = 0.5, scale: float = LABEL_SCALE) -> dict[str, float]:
    """Soft label as {class name: weight}; a same-class pair gets all weight on it.

    Args:
        strength: the strength that ran (use :func:`effective_strength`).
        gamma: exponent on the strength (paper: 0.5; later scripts 0.8).
        scale: k, the total mass (default :data:`LABEL_SCALE` = 1.0, the authors' paper-era
            training script and long-tail runs; their later loaders: 0.9).
    """
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be in [0, 1], got {strength}")
    if gamma <= 0:
        raise ValueError(f"label gamma must be > 0, got {gamma}")
    if not 0.0 < scale <= 1.0:
        raise ValueError(f"label scale k must be in (0, 1], got {scale}")
    if source_class == target_class:
        return {source_class: scale}
    w_target = strength ** gamma
    return {source_class: scale * (1.0 - w_target), target_class: scale * w_target}


def label_vector(label: dict[str, float], classes: Sequence[str]) -> torch.Tensor:
    """Expand a {class: weight} label over the class list, shape (num_classes,)."""
    index = {name: i for i, name in enumerate(classes)}
    vec = torch.zeros(len(classes))
    for name, weight in label.items():
        if name not in index:
            raise ValueError(f"label names class {name!r}, which is not among the {len(classes)} classes")
        vec[index[name]] += weight
    return vec
