"""Soft labels (docs/method.md §3): exhaustive checks of the pure formula."""
from __future__ import annotations

import pytest
import torch

from diffmix_core.labels import effective_strength, label_vector, soft_label, steps_run


@pytest.mark.parametrize("n,s,want", [(25, 0.7, 17), (25, 0.5, 12), (25, 1.0, 25), (25, 0.03, 0), (10, 0.3, 3),
                                      (25, 0.0, 0), (7, 0.999, 6)])
def test_steps_run_follows_diffusers(n, s, want):
    assert steps_run(n, s) == want
    assert effective_strength(n, s) == want / n


@pytest.mark.parametrize("s", [0.0, 0.1, 0.48, 0.68, 0.88, 1.0])
@pytest.mark.parametrize("gamma", [0.5, 0.8, 1.0])
@pytest.mark.parametrize("k", [1.0, 0.9])
def test_soft_label_formula(s, gamma, k):
    y = soft_label("a", "b", s, gamma, k)
    assert y["b"] == pytest.approx(k * s ** gamma)
    assert y["a"] == pytest.approx(k * (1 - s ** gamma))
    assert sum(y.values()) == pytest.approx(k)


def test_same_class_gets_all_mass_and_bad_settings_refused():
    assert soft_label("a", "a", 0.7, 0.5, 0.9) == {"a": 0.9}
    for kwargs in ({"strength": 1.2}, {"gamma": 0}, {"scale": 0}, {"scale": 1.5}):
        args = {"source_class": "a", "target_class": "b", "strength": 0.5, **kwargs}
        with pytest.raises(ValueError):
            soft_label(**args)


def test_label_vector():
    v = label_vector(soft_label("owl", "duck", 0.64, 0.5), ["crow", "duck", "owl"])
    assert torch.allclose(v, torch.tensor([0.0, 0.8, 0.2]))
    with pytest.raises(ValueError, match="not among"):
        label_vector({"emu": 1.0}, ["crow"])
