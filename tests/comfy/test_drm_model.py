"""The DRM forward on ComfyUI's MMDiT, the checkpoint formats, and the latent conventions."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def parts(tiny_generator):
    from drm.model import build_drm
    from trainer.demo.tiny import tiny_conditioning, tiny_drm_state_dict

    gen_sd, patcher = tiny_generator
    drm_sd = tiny_drm_state_dict(gen_sd, blocks=1)
    drm = build_drm(drm_sd, blocks=1).eval()
    cond = tiny_conditioning(seed=3, batch=3)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 16, 24, 32, generator=gen)  # non-square on purpose
    t = torch.tensor([100.0, 500.0, 900.0])
    return dict(gen_sd=gen_sd, mmdit=patcher.model.diffusion_model, drm_sd=drm_sd, drm=drm,
                x=x, t=t, ctx=cond[0][0], y=cond[0][1]["pooled_output"])


@torch.no_grad()
def test_score_equals_forward_written_by_hand(parts):
    """Embed, run block 0, final layer, unpatchify, head: by hand on the generator's own modules."""
    m, x, t, ctx, y = parts["mmdit"], parts["x"], parts["t"], parts["ctx"], parts["y"]
    h = m.x_embedder(x) + m.cropped_pos_embed(x.shape[-2:], device=x.device)
    c = m.t_embedder(t, dtype=x.dtype) + m.y_embedder(y)
    context, h = m.joint_blocks[0](m.context_embedder(ctx), h, c=c, use_checkpoint=False)
    features = m.unpatchify(m.final_layer(h, c), hw=x.shape[-2:])
    expected = parts["drm"].reward_output(features)
    assert torch.allclose(parts["drm"](x, t, ctx, y), expected, atol=1e-6, rtol=0)


@torch.no_grad()
def test_features_equal_comfy_forward_with_skipped_blocks(parts):
    """ComfyUI's own MMDiT.forward, with the skipped blocks patched to identity, gives the DRM's feature map."""
    m, x, t, ctx, y = parts["mmdit"], parts["x"], parts["t"], parts["ctx"], parts["y"]

    def identity(args, extra):
        return {"txt": args["txt"], "img": args["img"]}

    skipped = {("double_block", i): identity for i in range(1, len(m.joint_blocks))}
    reference = m(x, t, context=ctx, y=y, transformer_options={"patches_replace": {"dit": skipped}})
    assert torch.allclose(parts["drm"].features(x, t, ctx, y), reference, atol=1e-5, rtol=0)


@torch.no_grad()
def test_kept_block_count_changes_score(parts):
    from drm.model import build_drm
    from trainer.demo.tiny import tiny_drm_state_dict

    two = tiny_drm_state_dict(parts["gen_sd"], blocks=2)  # all blocks, the last is SD3's pre-only one
    one_block = build_drm(two, blocks=1).eval()
    two_blocks = build_drm(two, blocks=2).eval()
    args = parts["x"], parts["t"], parts["ctx"], parts["y"]
    assert torch.allclose(one_block(*args), parts["drm"](*args), atol=1e-6)
    assert (two_blocks(*args) - one_block(*args)).abs().min() > 1e-4


def test_official_format_round_trip(parts, tmp_path, to_official):
    from safetensors.torch import save_file

    from drm.checkpoint import load_checkpoint
    from drm.runtime import load_drm

    official = to_official(parts["drm_sd"], depth=2)
    assert "transformer.norm_out.linear.weight" in official
    assert not any(k.startswith("joint_blocks.") for k in official)
    path = tmp_path / "model.safetensors"
    save_file(official, str(path))
    assert load_checkpoint(path).format == "official"

    loaded = load_drm(path, weight_dtype=torch.float32)
    assert loaded.model.blocks == 1
    args = parts["x"], parts["t"], parts["ctx"], parts["y"]
    with torch.no_grad():
        assert torch.allclose(loaded.model(*args), parts["drm"](*args), atol=1e-5, rtol=0)


def test_official_full_depth_file_runs_depth_minus_skip_blocks(parts, tmp_path, monkeypatch, to_official):
    """The authors' files hold every block; their forward stops `skip` blocks early (3 for SD3.5-M).

    A depth-4 stand-in with skip 3 must score like a DRM built directly with 1 block."""
    from safetensors.torch import save_file

    import drm.checkpoint
    from drm.model import build_drm
    from drm.runtime import load_drm
    from trainer.demo.tiny import tiny_drm_state_dict, tiny_generator_state_dict

    depth = 4
    generator = tiny_generator_state_dict(depth=depth)
    official = to_official(tiny_drm_state_dict(generator, blocks=depth), depth=depth)
    assert f"transformer.transformer_blocks.{depth - 1}.attn.to_q.weight" in official
    save_file(official, str(tmp_path / "model.safetensors"))
    monkeypatch.setitem(drm.checkpoint.OFFICIAL_SKIPPED_BLOCKS, depth, 3)
    loaded = load_drm(tmp_path / "model.safetensors", weight_dtype=torch.float32)
    assert loaded.model.blocks == 1
    direct = build_drm(tiny_drm_state_dict(generator, blocks=1), blocks=1).eval()
    x = parts["x"][:, :, :16, :16]
    args = x, parts["t"], parts["ctx"], parts["y"]
    with torch.no_grad():
        assert torch.allclose(loaded.model(*args), direct(*args), atol=1e-5, rtol=0)


def test_official_import_swaps_scale_and_shift(parts, tmp_path, to_official):
    """Copying norm_out unswapped (the known trap) must give different scores: the test above has teeth."""
    from safetensors.torch import save_file

    from drm.runtime import load_drm

    official = to_official(parts["drm_sd"], depth=2)
    for name in ("weight", "bias"):
        key = f"transformer.norm_out.linear.{name}"
        scale, shift = official[key].chunk(2, dim=0)  # diffusers order
        official[key] = torch.cat([shift, scale]).contiguous()  # what an importer without the swap would keep
    path = tmp_path / "unswapped.safetensors"
    save_file(official, str(path))
    loaded = load_drm(path, weight_dtype=torch.float32)
    args = parts["x"], parts["t"], parts["ctx"], parts["y"]
    with torch.no_grad():
        assert (loaded.model(*args) - parts["drm"](*args)).abs().max() > 1e-3


def test_full_format_save_and_load(parts, tmp_path):
    from drm.checkpoint import load_checkpoint, save_full
    from drm.runtime import load_drm

    path = tmp_path / "drm.safetensors"
    save_full(parts["drm"], path, {"drm.base_model": "tiny-sd35"})
    ckpt = load_checkpoint(path)
    assert (ckpt.format, ckpt.blocks, ckpt.metadata["drm.base_model"]) == ("full", 1, "tiny-sd35")
    loaded = load_drm(path, weight_dtype=torch.float32)
    args = parts["x"], parts["t"], parts["ctx"], parts["y"]
    with torch.no_grad():
        assert torch.equal(loaded.model(*args), parts["drm"](*args))


def test_official_conversion_leaves_its_input_alone(parts, to_official):
    """ComfyUI's key converter swaps scale and shift in place; converting the same dict twice must not un-swap."""
    from drm.official import official_to_comfy

    official = to_official(parts["drm_sd"], depth=2)
    before = {k: v.clone() for k, v in official.items()}
    first, second = official_to_comfy(official), official_to_comfy(official)
    assert all(torch.equal(official[k], before[k]) for k in before)
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert torch.equal(first["final_layer.adaLN_modulation.1.weight"],
                       parts["drm_sd"]["final_layer.adaLN_modulation.1.weight"])


def test_a_bf16_drm_embeds_float32_timesteps_and_runs_its_head_in_float32(parts, tmp_path):
    """bf16 timesteps round 923.08 to 924 before the sinusoidal embedding; bf16 head outputs are 0.03 apart
    at |r| ~ 4. Both reach their modules in float32, whatever the weights' dtype."""
    from drm.files import atomic_save
    from drm.runtime import load_drm

    atomic_save(parts["drm_sd"], tmp_path / "drm.safetensors", {"drm.format": "full", "drm.blocks": "1"})
    drm = load_drm(tmp_path / "drm.safetensors", weight_dtype=torch.bfloat16)
    seen = {}
    hooks = [drm.model.backbone.t_embedder.register_forward_pre_hook(lambda m, a: seen.update(t=a[0].dtype)),
             drm.model.reward_output.register_forward_pre_hook(lambda m, a: seen.update(head=a[0].dtype))]
    try:
        scores = drm.score(parts["x"], torch.tensor([0.92308, 0.5, 0.1]), parts["ctx"], parts["y"])
    finally:
        for hook in hooks:
            hook.remove()
    assert seen == {"t": torch.float32, "head": torch.float32}
    assert {p.dtype for p in drm.model.reward_output.parameters()} == {torch.float32}
    assert next(drm.model.backbone.parameters()).dtype == torch.bfloat16
    assert scores.dtype == torch.float32 and torch.isfinite(scores).all()
