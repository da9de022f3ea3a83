"""The README's first command: the DRM scoring latents at several noise levels, through ComfyUI.

Everything is generated on the spot: a tiny SD3.5-architecture generator and a tiny DRM with random
weights. The numbers show the pipeline working, not image quality.
"""

from __future__ import annotations

import time

import comfy.sample
import comfy.sd
import torch

from drm.model import build_drm
from drm.runtime import LoadedDRM
from drm.tiny import tiny_conditioning, tiny_drm_state_dict, tiny_generator_state_dict


def run_demo(steps: int = 8, batch: int = 3, seed: int = 0) -> None:
    start = time.perf_counter()
    print("DRM demo on a TINY RANDOM-WEIGHT stand-in for SD3.5-Medium (depth 2, hidden 128).")
    print("It shows the pipeline end to end; its pictures are noise and its scores mean nothing.\n")
    generator_sd = tiny_generator_state_dict(seed=seed)
    model = comfy.sd.load_diffusion_model_state_dict(dict(generator_sd))
    drm = LoadedDRM(build_drm(tiny_drm_state_dict(generator_sd, blocks=1), blocks=1), name="tiny-drm")
    positive, negative = tiny_conditioning(seed=seed), tiny_conditioning(seed=seed + 1)
    empty = torch.zeros(batch, 16, 32, 32)  # 256x256 pixels
    noise = comfy.sample.prepare_noise(empty, seed)
    sampling = model.get_model_object("model_sampling")

    print(f"Sampling {batch} latents with euler/simple, {steps} steps, cfg 3.0; stopping early leaves noise,")
    print("as KSamplerAdvanced does, and DRM Score Latent scores each latent at its noise level.\n")
    header = f"{'step':>4}  {'sigma':>6}  " + "  ".join(f"latent {i:<2}" for i in range(batch)) + "  best"
    print(header)
    print("-" * len(header))
    for stop in range(1, steps + 1):
        samples = comfy.sample.sample(model, noise, steps, 3.0, "euler", "simple", positive, negative, empty,
                                      last_step=stop, force_full_denoise=False, disable_pbar=True, seed=seed)
        sigma = drm.schedule_sigma(steps, "simple", stop, sampling)
        scores = drm.score_latents(samples, sigma, positive)
        cells = "  ".join(f"{s:+9.4f}" for s in scores.tolist())
        print(f"{stop:>4}  {sigma:6.3f}  {cells}  #{int(scores.argmax())}")
    print(f"\nDone in {time.perf_counter() - start:.1f} s. Next: `python -m pytest -rs` runs the tests.")
