"""`trainer drm`'s per-model defaults (SD3.5-Large as the DRM authors train it) and `--recipe authors`."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from trainer.config import ConfigError
from trainer.reward.config import RESUMABLE, DRMTrainConfig, base_depth
from trainer.reward.train import kept_blocks
from trainer.runs import write_run_file

MEDIUM, LARGE = 24, 38

# The DRM authors' values, read from jjaxonx/DRM at 5c3c101 (written out here, not taken from the trainer).
AUTHORS_BOTH = {
    "mode": "full",  # drm/train.py:330-334: model.requires_grad_(True); only VAE and text encoders frozen
    "lr": 1e-5,  # train.py:96; medium.sh:19, large.sh:22
    "warmup_steps": 0,  # train.py:97 lr_scheduler "constant" ignores lr_warmup_steps (:98)
    "weight_decay": 1e-4,  # train.py:104
    "grad_clip": 1.0,  # train.py:106
    "min_confidence": 0.95,  # train.py:140; medium.sh:16, large.sh:16
    "epochs": 1,  # medium.sh:22, large.sh:25
    "resolution": 512,  # medium.sh:13, large.sh:13
    "precision": "bf16",  # medium.sh:20, large.sh:23
    "t5_length": 512,  # train.py:80
    "prompt_text": "plain",  # train.py:166-192 (no weighting syntax; CLIP cut at 77)
    "image_resize": "squash",  # dataset.py:79-80
    "vae_latent": "sample",  # train.py:490, 505
    "seed": 42,  # train.py:82
}
AUTHORS_MEDIUM = {
    "batch_size": 16,  # medium.sh:17 (2 per GPU), :18 (accumulation 1), :9 (8 processes)
    "timestep_sampling": "logit-normal",  # train.py:474-484; no --uniform in medium.sh
    "timestep_shift": 0.0,  # the scheduler's own (3), no --shift in medium.sh; 0 means the base's own
    "grad_checkpointing": False,  # no --gradient_checkpointing in medium.sh
}
AUTHORS_LARGE = {
    "batch_size": 8,  # large.sh:19 (1 per GPU), :20 (accumulation 1), :9 (8 processes)
    "timestep_sampling": "uniform",  # large.sh:17
    "timestep_shift": 1.0,  # large.sh:18; train.py:146-150 (--shift sets 1.0)
    "grad_checkpointing": True,  # large.sh:21
}
AUTHORS_KEPT = {MEDIUM: 21, LARGE: 33}  # utils.py:13-16 skips 3 (2BConvGN) and 5 (7BConvGN) blocks


@pytest.mark.parametrize(("depth", "per_model"), [(MEDIUM, AUTHORS_MEDIUM), (LARGE, AUTHORS_LARGE)])
def test_the_authors_recipe_resolves_to_the_authors_values(depth, per_model):
    cfg = DRMTrainConfig(recipe="authors").resolved(depth)
    for key, value in {**AUTHORS_BOTH, **per_model}.items():
        assert getattr(cfg, key) == value, key
    assert kept_blocks(cfg, depth) == AUTHORS_KEPT[depth]
    assert cfg.resolved(depth) == cfg  # resolving again changes nothing


def test_values_the_user_sets_win_over_the_recipe_and_the_large_defaults():
    cfg = DRMTrainConfig(recipe="authors", lr=3e-5, mode="adapter", timestep_sampling="logit-normal",
                         grad_checkpointing=False, blocks=35, max_steps=50).resolved(LARGE)
    assert (cfg.lr, cfg.mode, cfg.timestep_sampling, cfg.grad_checkpointing) == (3e-5, "adapter", "logit-normal", False)
    assert kept_blocks(cfg, LARGE) == 35
    assert (cfg.max_steps, cfg.epochs) == (50, 0)  # a max_steps given means no epoch count
    assert (cfg.weight_decay, cfg.timestep_shift, cfg.batch_size) == (1e-4, 1.0, 8)  # the rest still filled


def test_large_trains_as_the_authors_by_default_and_other_bases_keep_todays_defaults():
    large = DRMTrainConfig().resolved(LARGE)
    assert (large.timestep_sampling, large.timestep_shift, large.grad_checkpointing) == ("uniform", 1.0, True)
    assert kept_blocks(large, LARGE) == 33
    # nothing else moves for Large without the recipe
    assert (large.mode, large.lr, large.batch_size, large.seed) == ("adapter", 1e-4, 8, 0)
    for depth in (MEDIUM, 2, 30):
        assert DRMTrainConfig().resolved(depth) == DRMTrainConfig()
    assert [kept_blocks(DRMTrainConfig(), d) for d in (MEDIUM, 30, 2)] == [21, 27, 1]
    with pytest.raises(ConfigError, match="blocks: 39 is more than the base model's 38 joint blocks"):
        kept_blocks(DRMTrainConfig(blocks=39), LARGE)


def test_epochs_set_max_steps_from_the_training_pairs():
    cfg = DRMTrainConfig(recipe="authors").resolved(MEDIUM)
    assert cfg.with_epochs(100).max_steps == 7  # ceil(100 / 16)
    assert DRMTrainConfig(epochs=2, batch_size=8).with_epochs(100).max_steps == 25
    assert DRMTrainConfig(max_steps=3).with_epochs(100).max_steps == 3  # epochs 0: max_steps as given


def fake_base(path, depth: int, prefix: str = "model.diffusion_model.") -> str:
    """A safetensors file with an MMDiT's joint-block names (tiny tensors): all base_depth reads."""
    save_file({f"{prefix}joint_blocks.{i}.x_block.attn.qkv.weight": torch.zeros(1) for i in range(depth)}
              | {f"{prefix}final_layer.linear.weight": torch.zeros(1)}, str(path))
    return str(path)


def test_the_depth_is_read_from_the_header_of_a_checkpoint_or_a_diffusion_model(tmp_path):
    assert base_depth(fake_base(tmp_path / "large.safetensors", LARGE)) == LARGE
    assert base_depth(fake_base(tmp_path / "medium.safetensors", MEDIUM, prefix="")) == MEDIUM
    (tmp_path / "not.safetensors").write_bytes(b"not a safetensors file")
    assert base_depth(str(tmp_path / "not.safetensors")) == 0


def test_a_resumed_run_resolves_the_same_and_a_changed_recipe_is_refused(tmp_path):
    base = fake_base(tmp_path / "large.safetensors", LARGE)
    data = tmp_path / "pairs.jsonl"
    data.write_text("")
    out = tmp_path / "run"
    out.mkdir()
    first = DRMTrainConfig(base=base, data=str(data), out=str(out), recipe="authors").resolved(LARGE)
    write_run_file(first)  # what train_drm writes: the resolved settings
    (out / "checkpoint").mkdir()
    (out / "checkpoint" / "state.pt").write_bytes(b"")
    saved = json.loads((out / "run.json").read_text())
    assert (saved["recipe"], saved["batch_size"], saved["timestep_shift"]) == ("authors", 8, 1.0)
    DRMTrainConfig(base=base, data=str(data), out=str(out), recipe="authors", resume=True).validate()
    with pytest.raises(ConfigError, match=r"different settings for \[.*'lr'.*'mode'.*\]"):
        DRMTrainConfig(base=base, data=str(data), out=str(out), resume=True).validate()
    # training on with more steps: max_steps replaces the epoch count, and both may change on --resume
    assert {"max_steps", "epochs"} <= RESUMABLE
    DRMTrainConfig(base=base, data=str(data), out=str(out), recipe="authors", resume=True, max_steps=900).validate()
    with pytest.raises(ConfigError, match="epochs: 2 sets max_steps from the number of pairs, and max_steps is set"):
        DRMTrainConfig(base=base, data=str(data), out=str(out), epochs=2, max_steps=900).validate()


def test_the_recipe_is_a_named_choice():
    assert DRMTrainConfig().recipe == ""
    with pytest.raises(ConfigError, match=r"^recipe: expected '' or 'authors', got 'paper'"):
        DRMTrainConfig(recipe="paper")
    with pytest.raises(ConfigError, match=r"^epochs: expected >= 0, got -1"):
        DRMTrainConfig(epochs=-1)
