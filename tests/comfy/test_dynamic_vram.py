"""DRM loading under Dynamic VRAM (ComfyUI 0.26+), forced on as a Windows GPU run has it.

With comfy.model_management.WINDOWS and comfy.memory_management.aimdo_enabled both set, ComfyUI's
Linear layers are built without weights and take a file's tensors as they are: not cast to the chosen
dtype and not shape-checked. The pack checks and casts what it loads itself, so every format and
every dtype choice must load and score exactly as with the flags off, and a wrong-size file must be
refused by name either way.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

FORMATS = ("full", "official", "adapter")


@pytest.fixture
def dynamic_vram(comfyui, monkeypatch):
    """A context manager that turns both flags on while it is active."""
    memory_management = pytest.importorskip(
        "comfy.memory_management", reason="this ComfyUI has no Dynamic VRAM (comfy.memory_management); 0.26+ has")
    import comfy.model_management

    @contextlib.contextmanager
    def flags_on():
        with monkeypatch.context() as patch:
            patch.setattr(comfy.model_management, "WINDOWS", True)
            patch.setattr(memory_management, "aimdo_enabled", True)
            yield

    return flags_on


def test_flags_on_really_leave_linear_layers_without_weights(dynamic_vram):
    """The premise: with the flags on, ComfyUI's ops build Linear layers lazily (else this file tests nothing)."""
    import comfy.ops

    with dynamic_vram():
        layer = comfy.ops.disable_weight_init.Linear(4, 3, dtype=torch.bfloat16)
        assert layer.weight is None
        layer.load_state_dict({"weight": torch.zeros(7, 5), "bias": torch.zeros(3)}, strict=False)
        assert layer.weight.dtype == torch.float32 and layer.weight.shape == (7, 5)  # as it came, unchecked


def test_tiny_models_are_complete_with_the_flags_on(dynamic_vram):
    from trainer.demo.tiny import tiny_generator_state_dict

    reference = tiny_generator_state_dict()
    with dynamic_vram():
        made = tiny_generator_state_dict()
    assert made.keys() == reference.keys()
    assert all(torch.equal(made[k], reference[k]) for k in reference)


@pytest.fixture(scope="module")
def drm_files(tiny_generator, tmp_path_factory, to_official) -> dict:
    """One tiny DRM file per format, all fp32, written with the flags off."""
    from safetensors.torch import save_file

    from drm.files import atomic_save
    from trainer.demo.tiny import tiny_adapter_drm_state_dict, tiny_drm_state_dict

    gen_sd, _ = tiny_generator
    root = tmp_path_factory.mktemp("dynamic-vram")
    full = tiny_drm_state_dict(gen_sd, blocks=1)
    atomic_save(full, root / "full.safetensors", {"drm.format": "full", "drm.blocks": "1"})
    save_file(to_official(full, depth=2), str(root / "official.safetensors"))
    atomic_save(tiny_adapter_drm_state_dict(gen_sd, blocks=1), root / "adapter.safetensors",
                {"drm.format": "adapter", "drm.blocks": "1"})
    return {fmt: root / f"{fmt}.safetensors" for fmt in FORMATS}


def load_generator():
    """The tiny generator as ComfyUI loads a diffusion model (lazily, when the flags are on)."""
    import comfy.sd

    from trainer.demo.tiny import tiny_generator_state_dict

    return comfy.sd.load_diffusion_model_state_dict(tiny_generator_state_dict())


def score(path, weight_dtype: str) -> tuple[torch.Tensor, object]:
    from drm.runtime import WEIGHT_DTYPES, load_drm
    from trainer.demo.tiny import tiny_conditioning

    base = load_generator() if "adapter" in path.name else None
    drm = load_drm(path, weight_dtype=WEIGHT_DTYPES[weight_dtype], base_model=base)
    cond = tiny_conditioning(seed=4, batch=2)
    x = torch.randn(2, 16, 16, 16, generator=torch.Generator().manual_seed(0))
    return drm.score(x, 0.5, cond[0][0], cond[0][1]["pooled_output"]), drm


@pytest.mark.parametrize("weight_dtype", ["default", "fp32", "bf16", "fp16"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_and_dtype_scores_as_with_the_flags_off(drm_files, dynamic_vram, fmt, weight_dtype):
    expected, _ = score(drm_files[fmt], weight_dtype)
    with dynamic_vram():
        scores, drm = score(drm_files[fmt], weight_dtype)
    wanted = {"default": drm.dtype, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[weight_dtype]
    # (an adapter's own LoRA and every head stay float32 by design: they compute in float32)
    dtypes = {name: p.dtype for name, p in drm.model.named_parameters()
              if not name.startswith(("lora.", "reward_output."))}
    assert dtypes and set(dtypes.values()) == {wanted}, dtypes
    assert {p.dtype for p in drm.model.reward_output.parameters()} == {torch.float32}
    assert torch.isfinite(scores).all() and torch.equal(scores, expected), (scores, expected)


@pytest.mark.parametrize("flags", ["off", "on"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_a_wrong_size_file_is_refused_by_name(drm_files, dynamic_vram, tmp_path, fmt, flags):
    from safetensors.torch import save_file

    from drm.checkpoint import DRMCheckpointError, read_safetensors
    from drm.runtime import load_drm

    tensors, metadata = read_safetensors(drm_files[fmt])
    key = {"full": "joint_blocks.0.x_block.attn.qkv.weight",
           "official": "transformer.transformer_blocks.0.attn.to_q.weight",
           "adapter": "final_layer.linear.weight"}[fmt]
    tensors[key] = tensors[key][:-8].contiguous()  # a file for a model with other layer sizes
    bad = tmp_path / f"bad-{fmt}.safetensors"
    save_file(tensors, str(bad), metadata=metadata)
    with dynamic_vram() if flags == "on" else contextlib.nullcontext():
        base = load_generator() if fmt == "adapter" else None
        with pytest.raises(DRMCheckpointError, match=r"weights do not fit: .*(in the file but|do not form one SD3)"):
            load_drm(bad, weight_dtype=torch.bfloat16, base_model=base)
