"""An imported DiNa-LRM scores exactly as the architecture's own forward does.

The reference is the authors' structure rebuilt from public libraries: a tiny SD3.5-architecture
transformer in diffusers (dual attention in its first blocks, so the attn2 LoRA counts), the first
blocks held by a backbone module as the authors hold them, a peft LoRA on it saved with
save_pretrained (the published layout), and the head computed functionally from rm_head.pt with an
explicit softmax. The pack's side goes through `trainer import-dina`, DRM Loader and DRM Score Latent.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

BLOCKS, IMAGE_TAPS, TEXT_TAPS, RANK, ALPHA = 3, [1, 3], [2, 3], 4, 8.0
EPS = torch.finfo(torch.float32).eps
DRM_NAME = "tiny-dina.safetensors"


class Backbone(nn.Module):
    """The authors' SD3Backbone: references to the transformer's embedders and its first blocks."""

    def __init__(self, transformer, blocks: int):
        super().__init__()
        self.pos_embed = transformer.pos_embed
        self.time_text_embed = transformer.time_text_embed
        self.context_embedder = transformer.context_embedder
        self.transformer_blocks = nn.ModuleList(transformer.transformer_blocks[:blocks])

    def forward(self, x, timestep, context, pooled):
        hidden, temb, enc = self.pos_embed(x), self.time_text_embed(timestep, pooled), self.context_embedder(context)
        image = [hidden] if 0 in IMAGE_TAPS else []
        text = [enc] if 0 in TEXT_TAPS else []
        for i, block in enumerate(self.transformer_blocks):
            enc, hidden = block(hidden_states=hidden, encoder_hidden_states=enc, temb=temb)
            if i + 1 in IMAGE_TAPS:
                image.append(hidden)
            if i + 1 in TEXT_TAPS:
                text.append(enc)
        return image, text, temb


def reference_head(sd: dict, image: list, text: list, temb, heads: int = 8) -> torch.Tensor:
    """DiNa-LRM's head written out from its state dict: FiLM adapters, gated two-stream attention, FFN."""
    def lin(x, name):
        return F.linear(x, sd[name + ".weight"], sd[name + ".bias"])

    def rms(x, name):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS) * sd[name + ".weight"]

    def film(x, name):
        gamma, beta = lin(F.silu(lin(temb, name + ".cond_mlp.0")), name + ".cond_mlp.2").chunk(2, dim=-1)
        return lin(x * (1 + gamma[:, None]) + beta[:, None] + sd[name + ".layer_embed"], name + ".proj")

    def attend(q, ctx, k_name, v_name, gate):
        k, v = lin(ctx, k_name), lin(ctx, v_name)
        if gate:
            v = v * torch.sigmoid(lin(F.silu(lin(ctx, gate + ".0")), gate + ".2"))
        split = lambda t: t.unflatten(-1, (heads, -1)).transpose(1, 2)  # noqa: E731
        q, k, v = split(q), split(k), split(v)
        weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
        return (weights @ v).transpose(1, 2).flatten(2)

    vis = lin(torch.cat([film(x, f"layer_adapters_visual.{i}") for i, x in enumerate(image)], -1), "agg_visual")
    txt = lin(torch.cat([film(x, f"layer_adapters_text.{i}") for i, x in enumerate(text)], -1), "agg_text")
    q = sd["query_tokens"].expand(vis.shape[0], -1, -1)
    qq = lin(rms(q, "attn1.norm_q"), "attn1.to_q")
    out = attend(qq, rms(vis, "attn1.norm_v"), "attn1.to_k_vis", "attn1.to_v_vis", "attn1.gate_vis") + \
        attend(qq, rms(txt, "attn1.norm_t"), "attn1.to_k_text", "attn1.to_v_text", "attn1.gate_text")
    q = q + lin(out, "attn1.to_out.0")
    qq = lin(rms(q, "attn2.norm_q"), "attn2.to_q")
    q = q + lin(attend(qq, rms(vis, "attn2.norm_v"), "attn2.to_k_vis", "attn2.to_v_vis", None), "attn2.to_out.0")
    q = q + lin(F.gelu(lin(rms(q, "norm_ff"), "ff.0")), "ff.2")
    return lin(q, "head").mean(dim=1).squeeze(1)


@pytest.fixture(scope="module")
def world(comfyui, models_dir, to_diffusers, tmp_path_factory):
    """A tiny generator (depth 4, attn2 in blocks 0-1), its reference DiNa-LRM, and the imported DRM file."""
    peft = pytest.importorskip("peft", reason="the reference LoRA needs peft (pip install peft)")
    import comfy.sd

    from drm.dina import import_dina
    from trainer.demo import synthetic
    from trainer.demo.tiny import tiny_generator_state_dict

    generator = tiny_generator_state_dict(depth=4)
    width = generator["x_embedder.proj.weight"].shape[0]
    transformer = to_diffusers(generator)
    assert len(transformer.transformer_blocks[0].attn2.to_q.weight) == width, "block 0 must have dual attention"
    config = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=synthetic.DINA_TARGET_MODULES, init_lora_weights="gaussian")
    reference = peft.get_peft_model(Backbone(transformer, BLOCKS), config)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in reference.named_parameters():
            if "lora_B" in name:  # peft starts B at zero; a trained LoRA is not
                p.normal_(std=0.05)
    head = synthetic.random_dina_head(width, IMAGE_TAPS, TEXT_TAPS)
    root = tmp_path_factory.mktemp("dina")
    snapshot = root / "snapshot"
    synthetic.write_dina_snapshot(snapshot, {}, head.state_dict(), synthetic.dina_model_section(BLOCKS, IMAGE_TAPS, TEXT_TAPS, RANK, ALPHA),
                        RANK, ALPHA)
    reference.save_pretrained(str(snapshot / "checkpoint" / "backbone_lora"))  # peft's own files replace ours
    import_dina(snapshot, models_dir / "drm" / DRM_NAME)
    base = comfy.sd.load_diffusion_model_state_dict(dict(generator))
    gen = torch.Generator().manual_seed(9)
    return dict(reference=reference.eval(), head=head.state_dict(), base=base,
                x0=torch.randn(2, 16, 16, 16, generator=gen),
                context=torch.randn(2, 77 + 128, 4096, generator=gen),  # T5 padded to 128, as DiNa-LRM trained
                pooled=torch.randn(2, 2048, generator=gen), snapshot=snapshot)


def reference_score(world, x_sigma: torch.Tensor, sigma: float) -> torch.Tensor:
    with torch.no_grad():
        image, text, temb = world["reference"](x_sigma, torch.full((x_sigma.shape[0],), sigma * 1000.0),
                                               world["context"], world["pooled"])
        return reference_head(world["head"], image, text, temb)


def score_node(pack, world, drm, latent, sigma, **protocol):
    cond = [[world["context"], {"pooled_output": world["pooled"]}]]
    out = pack.nodes.score.DRMScoreLatent.execute(drm, {"samples": latent}, cond, "sigma", sigma, 20, "simple", 20,
                                                   **protocol).args
    return torch.tensor(out[0])


@pytest.fixture(scope="module", params=["shared", "copy"])
def drm(request, pack, world):
    return pack.nodes.loader.DRMLoader.execute(DRM_NAME, "fp32", model=world["base"], backbone=request.param).args[0]


@pytest.mark.parametrize("sigma", [0.0, 0.3, 0.7])
def test_scores_equal_the_reference_on_leftover_noise_latents(pack, world, drm, sigma):
    """A KSamplerAdvanced latent with leftover noise at sigma, scored as it is (noise_sigma 0)."""
    gen = torch.Generator().manual_seed(10)
    x_sigma = (1 - sigma) * world["x0"] + sigma * torch.randn(world["x0"].shape, generator=gen)
    graph_latent = drm.latent_format.process_out(x_sigma / (1 - sigma))
    scores = score_node(pack, world, drm, graph_latent, sigma, noise_sigma=0.0)
    assert torch.allclose(scores, reference_score(world, x_sigma, sigma), atol=1e-4, rtol=0)


@pytest.mark.parametrize("noise_sigma", [0.3, 0.7])
def test_clean_latents_are_noised_as_the_authors_do(pack, world, drm, noise_sigma):
    """A clean latent, noised to noise_sigma with the seed's noise: (1 - u) x0 + u e."""
    noise = torch.randn(world["x0"].shape, generator=torch.Generator().manual_seed(7))
    expected = reference_score(world, (1 - noise_sigma) * world["x0"] + noise_sigma * noise, noise_sigma)
    scores = score_node(pack, world, drm, drm.latent_format.process_out(world["x0"]), 0.0, noise_sigma=noise_sigma, seed=7)
    assert torch.allclose(scores, expected, atol=1e-4, rtol=0)


def test_default_noise_level_comes_from_the_file_and_draws_average(pack, world, drm):
    latent = drm.latent_format.process_out(world["x0"])
    assert drm.recommended_noise_sigma() == 0.4 and drm.recommended_noise_sigma(for_images=True) == 0.1
    default = score_node(pack, world, drm, latent, 0.0, seed=3)
    assert torch.equal(default, score_node(pack, world, drm, latent, 0.0, noise_sigma=0.4, seed=3))
    draws = [score_node(pack, world, drm, latent, 0.0, noise_sigma=0.4, seed=3 + i) for i in range(3)]
    averaged = score_node(pack, world, drm, latent, 0.0, noise_sigma=0.4, seed=3, noise_draws=3)
    assert torch.allclose(averaged, torch.stack(draws).mean(0), atol=1e-6)
    assert not torch.allclose(draws[0], draws[1], atol=1e-3), "different seeds must draw different noise"


@pytest.mark.parametrize("node", ["DRMStepwiseKSampler", "SamplerDRMStepwise"])
def test_step_wise_sampling_runs_on_the_imported_drm(pack, world, node):
    import comfy.samplers
    from comfy_extras import nodes_custom_sampler as custom

    from drm.stepwise import schedule_sigmas

    drm = pack.nodes.loader.DRMLoader.execute(DRM_NAME, "fp32", model=world["base"]).args[0]
    positive = [[world["context"][:1], {"pooled_output": world["pooled"][:1]}]]
    negative = [[torch.zeros(1, 77 + 128, 4096), {"pooled_output": torch.zeros(1, 2048)}]]
    latent = {"samples": torch.zeros(1, 16, 16, 16)}
    search = (drm, 2, 0.7, "greedy", 2, 1.0, 0, -1)
    if node == "DRMStepwiseKSampler":
        out = pack.nodes.stepwise.DRMStepwiseKSampler.execute(world["base"], 3, 3, 2.0, "simple", positive, negative,
                                                              latent, 1.0, *search).args
        samples, trace = out[0]["samples"], out[1]
        assert len(trace) == 2 and all(math.isfinite(s) for s in trace)
    else:
        sampler = pack.nodes.stepwise.SamplerDRMStepwise.execute(*search).args[0]
        guider = comfy.samplers.CFGGuider(world["base"])
        guider.set_conds(positive, negative)
        guider.set_cfg(2.0)
        sigmas = schedule_sigmas(world["base"].get_model_object("model_sampling"), "simple", 3)
        samples = custom.SamplerCustomAdvanced().sample(custom.Noise_RandomNoise(3), guider, sampler, sigmas, latent)[0]["samples"]
    assert samples.shape == (1, 16, 16, 16) and torch.isfinite(samples).all()
