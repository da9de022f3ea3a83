"""Cost of one DRM scoring call relative to one generator call on the same latents, side by side.

    python bench/drm_cost.py [--depth 8] [--resolution 256] [--batch 2] [--dtype fp32] [--comfyui PATH]

All models are random-weight SD3.5-architecture MMDiTs. Two DRMs are timed against the generator:
- the paper's (ConvGN head), keeping depth - 3 blocks as the 2BConvGN variant does: expected ratio
  about (depth - 3) / depth, plus the head;
- DiNa-LRM's (query-attention head on image and text taps, LoRA on the generator's own blocks),
  keeping depth / 2 blocks as the released 12-of-24 model does: about 1/2, plus the LoRA and the head.
On a GPU it also prints each call's peak memory. Use --depth 24 --resolution 512 --dtype bf16 on a
GPU for SD3.5-Medium's size (the tiny position embedding covers up to 512 px).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        out.append(time.perf_counter() - start)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depth", type=int, default=8)
    parser.add_argument("--skip", type=int, default=3, help="blocks the DRM leaves out (default 3)")
    parser.add_argument("--resolution", type=int, default=256, help="image pixels (latent = resolution / 8)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--comfyui", help="ComfyUI tree (default: $COMFYUI_PATH)")
    args = parser.parse_args()

    from drm.host import import_comfy_or_exit

    import_comfy_or_exit(args.comfyui)
    import comfy.model_management
    import comfy.ops
    import comfy.sd

    from drm.head import DiNaHead
    from drm.lora import LoRA, target_paths
    from drm.model import DRM, build_drm
    from drm.tiny import tiny_conditioning, tiny_drm_state_dict, tiny_generator_state_dict

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    device = comfy.model_management.get_torch_device()
    generator_sd = tiny_generator_state_dict(depth=args.depth)
    blocks = args.depth - args.skip
    drm = build_drm(tiny_drm_state_dict(generator_sd, blocks=blocks), blocks=blocks,
                    operations=comfy.ops.disable_weight_init).to(device, dtype).eval()
    generator = comfy.sd.load_diffusion_model_state_dict(generator_sd).model.diffusion_model.to(device, dtype).eval()
    dina_blocks = max(1, args.depth // 2)
    taps = tuple(sorted({max(1, dina_blocks // 3), max(1, 2 * dina_blocks // 3), dina_blocks}))
    lora = LoRA.for_module(generator, target_paths(generator, blocks=dina_blocks + 1), rank=64, alpha=128).to(device, dtype)
    dina = DRM(generator, dina_blocks, None, DiNaHead(generator.hidden_size, generator.hidden_size, taps, taps),
               lora=lora, shared_backbone=True).to(device).eval()

    latent = args.resolution // 8
    x = torch.randn(args.batch, 16, latent, latent, device=device, dtype=dtype)
    t = torch.full((args.batch,), 500.0, device=device, dtype=dtype)
    cond = tiny_conditioning(batch=args.batch, tokens=77)
    context, pooled = cond[0][0].to(device, dtype), cond[0][1]["pooled_output"].to(device, dtype)

    with torch.no_grad():
        def run_generator():
            generator(x, t, context=context, y=pooled)

        def run_drm():
            drm(x, t, context, pooled)

        def run_dina():
            dina(x, t.float(), context, pooled)

        calls = {"generator": run_generator, "DRM (ConvGN)": run_drm, "DiNa-LRM": run_dina}
        peak = {}
        for name, fn in calls.items():  # warm-up, and each call's peak memory on a GPU
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            timed(fn, 2)
            if torch.cuda.is_available():
                peak[name] = torch.cuda.max_memory_allocated() / 2**30
        times = {name: [] for name in calls}
        for _ in range(args.repeats):  # interleaved, so drift on a shared machine hits all alike
            for name, fn in calls.items():
                times[name] += timed(fn, 1)

    median = {name: statistics.median(t) for name, t in times.items()}
    print(f"device {device}, {args.dtype}, depth {args.depth} (hidden {64 * args.depth}), "
          f"{args.resolution}x{args.resolution}, batch {args.batch}, {args.repeats} interleaved repeats")
    for name in calls:
        memory = f", peak {peak[name]:.2f} GiB" if name in peak else ""
        print(f"{name:16s} median {median[name] * 1e3:8.2f} ms{memory}")
    g = median["generator"]
    print(f"ratio DRM (ConvGN, {blocks} blocks) / generator: {median['DRM (ConvGN)'] / g:.3f}   "
          f"(expected about {blocks / args.depth:.3f} plus the head)")
    print(f"ratio DiNa-LRM ({dina_blocks} blocks, taps {list(taps)}) / generator: {median['DiNa-LRM'] / g:.3f}   "
          f"(expected about {dina_blocks / args.depth:.3f} plus the LoRA and the head)")


if __name__ == "__main__":
    main()
