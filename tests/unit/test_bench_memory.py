"""bench/drm_cost.py's CPU peak-memory counter, on calls whose peak is known exactly."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

MiB = 2**20


@pytest.fixture(scope="module")
def tensor_memory():
    path = Path(__file__).resolve().parents[2] / "bench" / "drm_cost.py"
    spec = importlib.util.spec_from_file_location("drm_cost_bench", path)
    module = importlib.util.module_from_spec(spec)
    saved = list(sys.path)
    try:  # the script puts the repository first on sys.path, where `nodes` would shadow ComfyUI's
        spec.loader.exec_module(module)
    finally:
        sys.path[:] = saved
    return module.TensorMemory


def mlp() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(1024, 4096), torch.nn.GELU(), torch.nn.Linear(4096, 1024)).requires_grad_(False)


def test_the_peak_is_the_two_hidden_activations_alive_at_once(tensor_memory):
    # [256, 4096] float32 is 4 MiB: the first Linear's output and GELU's output are alive together,
    # and the weights (16 MiB each, read through views) and the input are not counted.
    model, x = mlp(), torch.randn(256, 1024)
    with tensor_memory() as counted:
        out = model(x)
    assert counted.peak == 8 * MiB
    assert counted.live == out.untyped_storage().nbytes() == 1 * MiB


def test_in_place_results_and_views_are_not_new_memory(tensor_memory):
    x = torch.randn(1024, 256)
    with tensor_memory() as counted:
        y = x * 2  # 1 MiB, new
        y.relu_()
        y.view(256, 1024).t()
    assert counted.peak == counted.live == 1 * MiB


def test_freed_storages_leave_the_count(tensor_memory):
    x = torch.randn(1024, 256)
    with tensor_memory() as counted:
        for _ in range(5):
            x = x + 1  # the previous result is freed when x is rebound
    assert counted.peak == 2 * MiB
    assert counted.live == 1 * MiB
