"""Wall time of DRM step-wise sampling over plain sampling, and how much of it the forward passes explain.

    python bench/stepwise_overhead.py [--depth 6] [--resolution 256] [--steps 10] [--comfyui PATH]

Everything runs side by side in one process on random-weight SD3.5-architecture models:
- ratio: step-wise sampling at K = 1, 2, 4, 6 over ComfyUI's plain KSampler (euler), same steps
  (K = 1 is plain SDE sampling through this pack's sampler; it still scores each step for the trace);
- efficiency: measured time / (steps * T_model + branching_steps * K * T_drm), where T_model is one
  CFG model call (cond and uncond in one batch) and T_drm one DRM call on one latent, both timed alone.
  1.00 means no time is spent beyond the forward passes the method needs (target <= 1.05).
The paper's ratios on SD3.5-M, 512 px, 50 steps (GPU): 1.95, 2.69 and 3.41 at K = 2, 4 and 6.
Use --depth 24 --resolution 512 --steps 50 --dtype bf16 on a GPU for that setting.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

PAPER_RATIOS = {2: 1.95, 4: 2.69, 6: 3.41}


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depth", type=int, default=6)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--comfyui", help="ComfyUI tree (default: $COMFYUI_PATH)")
    args = parser.parse_args()

    from drm.host import import_comfy_or_exit

    import_comfy_or_exit(args.comfyui)
    import comfy.model_management
    import comfy.sample
    import comfy.samplers
    import comfy.sd

    from drm.model import build_drm
    from drm.runtime import LoadedDRM
    from drm.stepwise import schedule_sigmas, stepwise_ksampler
    from trainer.demo.tiny import tiny_conditioning, tiny_drm_state_dict, tiny_generator_state_dict

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    device = comfy.model_management.get_torch_device()
    generator_sd = tiny_generator_state_dict(depth=args.depth)
    blocks = args.depth - 3
    model = comfy.sd.load_diffusion_model_state_dict(dict(generator_sd), model_options={"dtype": dtype})
    drm = LoadedDRM(build_drm(tiny_drm_state_dict(generator_sd, blocks=blocks), blocks=blocks, dtype=dtype))
    positive, negative = tiny_conditioning(seed=0, tokens=77), tiny_conditioning(seed=1, tokens=77)
    latent = torch.zeros(1, 16, args.resolution // 8, args.resolution // 8)
    noise = comfy.sample.prepare_noise(latent, 0)
    sigmas = schedule_sigmas(model.get_model_object("model_sampling"), "simple", args.steps)
    branching_steps = args.steps - 1  # the last step, to sigma 0, is deterministic

    def sample(k: int):
        if k == 0:  # ComfyUI's own euler, the KSampler baseline
            sampler = comfy.samplers.sampler_object("euler")
        else:
            sampler = stepwise_ksampler(drm, branches=k, eta=0.7)
        comfy.sample.sample_custom(model, noise, 4.5, sampler, sigmas, positive, negative, latent,
                                   disable_pbar=True, seed=0)

    # Single calls, timed alone: one CFG model call (batch 2) and one DRM call (batch 1).
    comfy.model_management.load_models_gpu([model, drm.patcher])
    diffusion_model = model.model.diffusion_model
    x2 = torch.randn(2, *latent.shape[1:], device=device, dtype=dtype)
    t2 = torch.full((2,), 500.0, device=device, dtype=dtype)
    context = torch.cat([positive[0][0], negative[0][0]]).to(device, dtype)
    pooled = torch.cat([positive[0][1]["pooled_output"], negative[0][1]["pooled_output"]]).to(device, dtype)
    with torch.no_grad():
        t_model = median_time(lambda: diffusion_model(x2, t2, context=context, y=pooled), 5 * args.repeats)
        t_drm = median_time(lambda: drm.model(x2[:1], t2[:1], context[:1], pooled[:1]), 5 * args.repeats)

    sample(1)  # warm-up
    timings = {k: [] for k in (0, 1, 2, 4, 6)}
    for _ in range(args.repeats):  # interleaved, so drift on a shared machine hits every K alike
        for k in timings:
            timings[k].append(median_time(lambda k=k: sample(k), 1))
    measured = {k: statistics.median(v) for k, v in timings.items()}

    print(f"device {device}, {args.dtype}, depth {args.depth} (DRM keeps {blocks}), {args.resolution}x{args.resolution}, "
          f"{args.steps} steps, cfg 4.5, greedy, {args.repeats} interleaved repeats")
    print(f"single calls: T_model (CFG, batch 2) {t_model * 1e3:.1f} ms, T_drm (batch 1) {t_drm * 1e3:.1f} ms")
    print(f"{'sampler':>14}  {'time s':>7}  {'ratio':>5}  {'paper':>5}  {'efficiency':>10}")
    for k, seconds in measured.items():
        predicted = args.steps * t_model + branching_steps * k * t_drm
        paper = f"{PAPER_RATIOS[k]:5.2f}" if k in PAPER_RATIOS else "    -"
        name = "KSampler euler" if k == 0 else f"step-wise K={k}"
        print(f"{name:>14}  {seconds:7.3f}  {seconds / measured[0]:5.2f}  {paper}  {seconds / predicted:10.3f}")


if __name__ == "__main__":
    main()
