"""`python -m trainer demo --tiny`: every stage of the pipeline on a tiny random-weight SD3.5-architecture
model, in well under a minute; the tests and bench/grpo_convergence.py build on it.

1. generate a tiny generator (SD3.5-M's layout at depth 2) and synthetic preference pairs whose
   preferred latent follows a hidden rule (a brighter top half in channel 0);
2. train a DRM on them (`trainer drm`, adapter mode) and show its accuracy per noise level;
3. fine-tune the generator with Step-GRPO against that DRM (`trainer grpo`) into a LoRA;
4. back in ComfyUI: load the LoRA with ComfyUI's own LoRA loader and sample plainly and with DRM
   step-wise search, scored by the DRM.
Everything is made on the spot; nothing is downloaded. Its pictures are noise: `python -m trainer demo`
(trainer.demo) is the one whose pictures mean something.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch


def run_tiny_demo(out: str = "runs/demo-tiny", seed: int = 0, drm_steps: int = 120, grpo_iterations: int = 30) -> dict:
    """Run the stages; returns the summary (also written to <out>/demo.json). Raises ValueError when
    `out` cannot be the demo's folder (trainer.demo.demo_folder), RunInterrupted when Ctrl-C stops a stage."""
    from .world_demo import demo_folder

    with demo_folder(Path(out)) as root:
        return tiny_demo(root, seed, drm_steps, grpo_iterations)


def tiny_demo(root: Path, seed: int, drm_steps: int, grpo_iterations: int) -> dict:
    """The stages, written into `root`, an empty folder this process holds."""
    import comfy.sample
    import comfy.samplers
    import comfy.sd
    import comfy.utils

    from drm.conditioning import save_conditioning
    from drm.dina import import_dina
    from drm.files import atomic_save
    from drm.runtime import load_drm
    from drm.stepwise import schedule_sigmas, stepwise_ksampler

    from ..grpo.config import GRPOConfig
    from ..grpo.train import train_grpo
    from ..prompts import PromptBank
    from ..reward.config import DRMTrainConfig
    from ..reward.train import train_drm
    from .synthetic import synthetic_latent_pairs, tiny_dina_snapshot, tiny_vae_state_dict
    from .tiny import tiny_conditioning, tiny_generator_state_dict
    from .world_demo import stage, write_json

    start = time.perf_counter()
    for sub in ("models", "data"):
        (root / sub).mkdir()
    print("DRM demo on a TINY RANDOM-WEIGHT stand-in for SD3.5-Medium (depth 2, hidden 128, 64x64 pixels).")
    print("It runs every stage of the pipeline on a CPU; its images are noise and its rewards are synthetic.\n")

    base = root / "models" / "tiny-sd35.safetensors"
    generator_sd = tiny_generator_state_dict(seed=seed)
    atomic_save(generator_sd, base, {})
    atomic_save(tiny_vae_state_dict(seed), root / "models" / "tiny-vae.safetensors", {})
    synthetic_latent_pairs(256, size=8, seed=seed).save(root / "data" / "pairs.safetensors")
    conds = [tiny_conditioning(seed=seed + i) for i in range(4)]
    prompts = PromptBank([f"tiny prompt {i}" for i in range(4)], torch.cat([c[0][0] for c in conds]),
                         torch.cat([c[0][1]["pooled_output"] for c in conds]), torch.zeros(1, 8, 4096),
                         torch.zeros(1, 2048))
    prompts.save(root / "data" / "prompts.safetensors")
    for i in (0, 1):  # for the example workflows' DRM Load Cached Conditioning nodes
        save_conditioning(root / "data" / f"tiny-prompt-{i}.safetensors", conds[i][0][0],
                          conds[i][0][1]["pooled_output"], prompt=prompts.texts[i])
    save_conditioning(root / "data" / "tiny-negative.safetensors", prompts.negative_context,
                      prompts.negative_pooled, prompt="")
    # For the DiNa-LRM template: a stand-in in the public model's layout (random weights) through the real
    # importer, and a prompt shaped as that model needs it (T5 padded to 128 tokens)
    import_dina(tiny_dina_snapshot(root / "data" / "dina-snapshot", generator_sd), root / "dina" / "tiny-dina.safetensors")
    long_prompt = tiny_conditioning(seed=seed, tokens=77 + 128)
    save_conditioning(root / "data" / "tiny-prompt-t5-128.safetensors", long_prompt[0][0],
                      long_prompt[0][1]["pooled_output"], prompt=prompts.texts[0])

    print(f"[1/3] Training a DRM on 256 synthetic preference pairs ({drm_steps} steps, adapter mode)")
    drm_cfg = DRMTrainConfig(base=str(base), data=str(root / "data" / "pairs.safetensors"), out=str(root / "drm"),
                             mode="adapter", max_steps=drm_steps, batch_size=16, lr=1e-3, precision="fp32",
                             eval_every=drm_steps, log_every=10, seed=seed)
    drm_cfg.validate()
    accuracy = stage("1 (DRM training)", train_drm, drm_cfg)
    drm_file = next((root / "drm").glob("drm-*.safetensors"))

    print(f"\n[2/3] Step-GRPO against that DRM ({grpo_iterations} iterations, K = 4 siblings, 6 steps)")
    grpo_cfg = GRPOConfig(base=str(base), drm=str(drm_file), prompts=str(root / "data" / "prompts.safetensors"),
                          out=str(root / "grpo"), resolution=64, steps=6, branches=4, batch_size=2,
                          iterations=grpo_iterations, eval_every=10, save_every=grpo_iterations, lr=1e-3,
                          lora_rank=8, lora_alpha=8.0, seed=seed)
    grpo_cfg.validate()
    last = stage("2 (Step-GRPO)", train_grpo, grpo_cfg)
    lora_file = root / "grpo" / "tiny-sd35-step-grpo.safetensors"
    rewards = [float(r["eval_reward"]) for r in _csv(root / "grpo" / "metrics.csv") if r["eval_reward"]]

    print("\n[3/3] In ComfyUI: the LoRA through ComfyUI's LoRA loader, plain sampling vs DRM step-wise search")
    model = comfy.sd.load_diffusion_model(str(base))
    # Its own copy of the blocks it runs: the LoRA'd clone below changes the shared weights while it samples.
    drm = load_drm(drm_file, base_model=model, own_backbone=True)
    # One latent per training prompt, so the table measures what the trainer's eval measures.
    positive = [[prompts.context, {"pooled_output": prompts.pooled}]]
    negative = [[prompts.negative_context, {"pooled_output": prompts.negative_pooled}]]
    latent = torch.zeros(len(prompts.texts), 16, 8, 8)
    noise = comfy.sample.prepare_noise(latent, seed)
    sigmas = schedule_sigmas(model.get_model_object("model_sampling"), "simple", 6)
    lora = comfy.utils.load_torch_file(str(lora_file), safe_load=True)
    print(f"{'model':<22}{'sampler':<22}{'mean DRM score':>15}")
    for label, strength in (("base", 0.0), ("base + LoRA", 1.0)):
        patched, _ = comfy.sd.load_lora_for_models(model, None, lora, strength, 0.0)
        for name, sampler in (("euler", comfy.samplers.sampler_object("euler")),
                              ("step-wise K=4", stepwise_ksampler(drm, branches=4))):
            x = comfy.sample.sample_custom(patched, noise, 4.5, sampler, sigmas, positive, negative, latent,
                                           disable_pbar=True, seed=seed)
            score = drm.score_latents(x, 0.0, positive).mean().item()
            print(f"{label:<22}{name:<22}{score:>15.4f}")

    summary = {"drm_eval": accuracy, "grpo_eval_rewards": rewards, "seconds": round(time.perf_counter() - start, 1)}
    write_json(root / "demo.json", summary)
    print("\nDRM held-out accuracy by noise level: "
          + ", ".join(f"sigma {k[10:].replace('_', '-')}: {v:.2f}" for k, v in accuracy.items() if k.startswith("acc_")))
    print(f"Step-GRPO eval reward (ODE samples, DRM): {rewards[0]:+.3f} before -> {rewards[-1]:+.3f} after")
    print(f"Files in {root}: DRM {drm_file.relative_to(root)}, LoRA {lora_file.relative_to(root)}, "
          "reward curve grpo/reward_curve.png, before/after grids grpo/eval/, DRM curves drm/curves.png")
    print(f"Done in {summary['seconds']} s.")
    return summary | {"last": last}


def _csv(path: Path) -> list[dict]:
    import csv

    with path.open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))
