"""DRM file handling without ComfyUI: safetensors only, clear errors, nothing on disk changes."""

from __future__ import annotations

import hashlib

import pytest
import torch
from safetensors.torch import save_file

from drm.checkpoint import DRMCheckpointError, detect_format, load_checkpoint, read_safetensors
from drm.files import atomic_save


def fake_full_drm(channels: int = 16) -> dict[str, torch.Tensor]:
    return {
        "x_embedder.proj.weight": torch.zeros(128, channels, 2, 2),
        "joint_blocks.0.x_block.attn.qkv.weight": torch.zeros(384, 128),
        "joint_blocks.1.x_block.attn.qkv.weight": torch.zeros(384, 128),
        "reward_output.mlp.0.weight": torch.zeros(512, 512),
    }


def folder_digest(folder) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_full_checkpoint_is_detected_with_its_blocks(tmp_path):
    save_file(fake_full_drm(), str(tmp_path / "a.safetensors"))
    ckpt = load_checkpoint(tmp_path / "a.safetensors")
    assert (ckpt.format, ckpt.blocks) == ("full", 2)
    assert load_checkpoint(tmp_path / "a.safetensors", blocks=1).blocks == 1


def test_metadata_declares_the_format():
    assert detect_format(["anything"], {"drm.format": "adapter"}) == "adapter"
    assert detect_format(["transformer.transformer_blocks.0.attn.to_q.weight", "reward_output.mlp.0.weight"], {}) == "official"


def test_missing_file_names_the_folder(tmp_path):
    with pytest.raises(DRMCheckpointError, match="does not exist.*models/drm"):
        load_checkpoint(tmp_path / "nope.safetensors")


def test_truncated_file_is_refused_and_left_alone(tmp_path):
    save_file(fake_full_drm(), str(tmp_path / "drm.safetensors"))
    data = (tmp_path / "drm.safetensors").read_bytes()
    (tmp_path / "drm.safetensors").write_bytes(data[: len(data) // 2])
    before = folder_digest(tmp_path)
    with pytest.raises(DRMCheckpointError, match="drm.safetensors.*truncated"):
        load_checkpoint(tmp_path / "drm.safetensors")
    assert folder_digest(tmp_path) == before


def test_pickle_is_refused_without_unpickling(tmp_path):
    torch.save(fake_full_drm(), tmp_path / "drm.safetensors")  # a pickle under a safetensors name
    before = folder_digest(tmp_path)
    with pytest.raises(DRMCheckpointError, match="PyTorch pickle, not safetensors"):
        read_safetensors(tmp_path / "drm.safetensors")
    assert folder_digest(tmp_path) == before


def test_garbage_file_is_refused(tmp_path):
    (tmp_path / "drm.safetensors").write_bytes(b"hello, this is not a model")
    with pytest.raises(DRMCheckpointError, match="not a readable safetensors"):
        load_checkpoint(tmp_path / "drm.safetensors")


def test_sdxl_unet_is_named(tmp_path):
    save_file({"input_blocks.0.0.weight": torch.zeros(320, 4, 3, 3)}, str(tmp_path / "sdxl.safetensors"))
    with pytest.raises(DRMCheckpointError, match="sdxl.safetensors.*SD1/SDXL UNet"):
        load_checkpoint(tmp_path / "sdxl.safetensors")


def test_plain_sd3_model_without_head_is_named(tmp_path):
    sd = fake_full_drm()
    del sd["reward_output.mlp.0.weight"]
    save_file(sd, str(tmp_path / "sd35.safetensors"))
    with pytest.raises(DRMCheckpointError, match="without a reward head"):
        load_checkpoint(tmp_path / "sd35.safetensors")


def test_non_sd3_latent_channels_are_refused(tmp_path):
    save_file(fake_full_drm(channels=4), str(tmp_path / "sd1drm.safetensors"))
    with pytest.raises(DRMCheckpointError, match="16 latent channels"):
        load_checkpoint(tmp_path / "sd1drm.safetensors")


def test_atomic_save_leaves_no_partial_file_on_failure(tmp_path):
    atomic_save({"a": torch.zeros(2)}, tmp_path / "x.safetensors", {})
    before = folder_digest(tmp_path)
    with pytest.raises(ValueError):
        atomic_save({"a": "not a tensor"}, tmp_path / "x.safetensors", {})
    assert folder_digest(tmp_path) == before
