"""diffmix: Diff-Mix (CVPR 2024) inter-class image mixup with a diffusion model.

The library has one module per stage (see docs/design.md); the app and the CLI are
thin faces over it.
"""
from __future__ import annotations

__version__ = "0.1.0"
