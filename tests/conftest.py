"""Shared fixtures: tiny offline models are built once per test session."""
from __future__ import annotations

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

from helpers import make_world, world_environment

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session", autouse=True)
def output_root_in_tmp(tmp_path_factory):
    """The output root (saved profiles, the app's exports) of every test: a temporary folder unless
    a test sets DIFFMIX_OUTPUT itself, so no test writes into the user's data folder or the repo."""
    if os.environ.get("DIFFMIX_OUTPUT"):
        yield
        return
    os.environ["DIFFMIX_OUTPUT"] = str(tmp_path_factory.mktemp("output-root"))
    yield
    os.environ.pop("DIFFMIX_OUTPUT", None)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny SD-architecture pipeline saved with save_pretrained (random weights)."""
    from diffmix_core.models import tiny_pipeline_dir

    return tiny_pipeline_dir(tmp_path_factory.mktemp("models") / "tiny-sd")


@pytest.fixture
def tiny_pipe(tiny_model_dir):
    """A fresh tiny pipeline loaded through the same loader as a real one."""
    from diffmix_core.models import load_pipeline

    return load_pipeline(tiny_model_dir, device="cpu", dtype="fp32")


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny classifiers: one intra-op thread is fastest, and far faster on a shared, busy CPU
    (2 threads on 2 contended cores measured 1.8 s per test_resnet step vs 14 ms)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The app's test world under its own environment (helpers.make_world: the placeholder bundle with
    a tiny reference classifier); a module that needs another world defines its own ``world``."""
    root = tmp_path_factory.mktemp("ui")
    with world_environment(root):
        bundle_dir = make_world(root, tmp_path_factory.getbasetemp())
        yield {"root": root, "bundle": str(bundle_dir),
               "example": str(bundle_dir / "examples" / "owl" / "0.png")}


@pytest.fixture(scope="module")
def app_url(world):
    """The app launched on the requesting module's ``world`` fixture (its environment already set),
    closed after the module."""
    from diffmix_core.ui import build_demo

    demo = build_demo()
    demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", quiet=True)
    yield demo.local_url
    demo.close()
