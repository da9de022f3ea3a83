"""Cost of one DRM scoring call relative to one generator call on the same latents, side by side.

    python bench/drm_cost.py [--depth 8] [--resolution 256] [--batch 2] [--dtype fp32] [--comfyui PATH]

Both models are random-weight SD3.5-architecture MMDiTs (the DRM keeps depth - 3 blocks, as the
2BConvGN variant does). Expected ratio: about (depth - 3) / depth, plus the head. Use
--depth 24 --resolution 512 --dtype bf16 on a GPU for SD3.5-Medium's size.
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

    from drm.host import import_comfy

    import_comfy(args.comfyui)
    import comfy.model_management
    import comfy.ops
    import comfy.sd

    from drm.model import build_drm
    from drm.tiny import tiny_conditioning, tiny_drm_state_dict, tiny_generator_state_dict

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    device = comfy.model_management.get_torch_device()
    generator_sd = tiny_generator_state_dict(depth=args.depth)
    blocks = args.depth - args.skip
    drm = build_drm(tiny_drm_state_dict(generator_sd, blocks=blocks), blocks=blocks,
                    operations=comfy.ops.disable_weight_init).to(device, dtype).eval()
    generator = comfy.sd.load_diffusion_model_state_dict(generator_sd).model.diffusion_model.to(device, dtype).eval()

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

        for fn in (run_generator, run_drm):  # warm-up
            timed(fn, 2)
        gen_times, drm_times = [], []
        for _ in range(args.repeats):  # interleaved, so drift on a shared machine hits both alike
            gen_times += timed(run_generator, 1)
            drm_times += timed(run_drm, 1)

    g, d = statistics.median(gen_times), statistics.median(drm_times)
    print(f"device {device}, {args.dtype}, depth {args.depth} (hidden {64 * args.depth}), DRM keeps {blocks} blocks, "
          f"{args.resolution}x{args.resolution}, batch {args.batch}, {args.repeats} interleaved repeats")
    print(f"generator call  median {g * 1e3:8.2f} ms")
    print(f"DRM call        median {d * 1e3:8.2f} ms")
    print(f"ratio DRM / generator: {d / g:.3f}   (expected about {blocks / args.depth:.3f} plus the head)")


if __name__ == "__main__":
    main()
