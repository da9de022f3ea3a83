"""`trainer drm --mode full` starts from the base file's exact weights, and `--recipe authors` runs end to end."""

from __future__ import annotations

import json
import math

import pytest
import torch


@pytest.fixture(scope="module")
def base(comfyui, tmp_path_factory):
    """The tiny generator saved in float32, its weights drawn in float32 (most are not bf16 values)."""
    from drm.files import atomic_save
    from trainer.demo.tiny import tiny_generator_state_dict

    path = tmp_path_factory.mktemp("recipe") / "tiny-sd35.safetensors"
    atomic_save(tiny_generator_state_dict(), path, {})
    return path


@pytest.mark.parametrize("autocast", [False, True])
def test_full_mode_trains_the_base_files_own_float32_weights(base, autocast):
    """Where bf16 autocast runs (on a GPU), the base was loaded bf16, so `full` trained rounded copies."""
    from drm.checkpoint import read_safetensors
    from trainer.models import load_base
    from trainer.reward.config import DRMTrainConfig
    from trainer.reward.train import base_dtype, build_trainable_drm

    cfg = DRMTrainConfig(mode="full", blocks=1)
    loaded = load_base(str(base), dtype=base_dtype(cfg, autocast))
    drm, blocks = build_trainable_drm(cfg, loaded, torch.device("cpu"))
    stored, _ = read_safetensors(base, what="base")
    trained = {k: p for k, p in drm.named_parameters() if p.requires_grad and not k.startswith("reward_output.")}
    names = [k.removeprefix("backbone.") for k in trained]
    assert blocks == 1 and "joint_blocks.0.x_block.attn.qkv.weight" in names and "final_layer.linear.weight" in names
    rounded = 0
    for name, param in zip(names, trained.values()):
        assert param.dtype == torch.float32
        assert torch.equal(param.detach(), stored[name]), name  # bit for bit, not merely close
        rounded += not torch.equal(stored[name], stored[name].bfloat16().float())
    assert rounded > 10  # a bf16 load would have changed these


def test_adapter_mode_still_shares_a_bf16_base_under_autocast():
    from trainer.reward.config import DRMTrainConfig
    from trainer.reward.train import base_dtype

    assert base_dtype(DRMTrainConfig(), autocast=True) == torch.bfloat16
    assert base_dtype(DRMTrainConfig(mode="head"), autocast=False) == torch.float32


def test_the_authors_recipe_trains_one_epoch_and_resumes_only_with_the_recipe(base, tmp_path):
    from drm.checkpoint import read_safetensors
    from trainer.__main__ import main
    from trainer.demo.synthetic import synthetic_latent_pairs

    pairs = synthetic_latent_pairs(40, seed=0)
    pairs.preferred_std = torch.full_like(pairs.preferred, 0.05)  # vae_latent sample needs the posterior's std
    pairs.rejected_std = torch.full_like(pairs.rejected, 0.05)
    pairs.save(tmp_path / "pairs.safetensors")
    out = tmp_path / "run"

    def run(*extra) -> int:
        return main(["drm", "--base", str(base), "--data", str(tmp_path / "pairs.safetensors"), "--out", str(out),
                     "--eval-every", "100", "--log-every", "1", *extra])

    assert run("--recipe", "authors") == 0
    saved = json.loads((out / "run.json").read_text())
    train_pairs = len(pairs.split(0.1, 42)[0])  # the holdout's 10%, split by prompt with the recipe's seed
    expected = {"recipe": "authors", "mode": "full", "lr": 1e-5, "weight_decay": 1e-4, "min_confidence": 0.95,
                "batch_size": 16, "epochs": 1, "max_steps": math.ceil(train_pairs / 16), "seed": 42,
                "vae_latent": "sample", "timestep_sampling": "logit-normal", "grad_checkpointing": False}
    assert {k: saved[k] for k in expected} == expected
    rows = (out / "metrics.csv").read_text().splitlines()[1:]
    assert [int(r.split(",")[0]) for r in rows] == list(range(1, expected["max_steps"] + 1))
    _, meta = read_safetensors(out / "drm-tiny-sd35-full.safetensors", what="DRM")
    assert json.loads(meta["drm.config"])["recipe"] == "authors" and meta["drm.train_mode"] == "full"
    assert run("--resume") == 2  # without the recipe the settings differ: refused
    assert run("--recipe", "authors", "--resume", "--max-steps", str(expected["max_steps"] + 1)) == 0
    assert int((out / "metrics.csv").read_text().splitlines()[-1].split(",")[0]) == expected["max_steps"] + 1
