"""Cost of DRM scoring against one generator call on the same latents, side by side, and its peak memory.

    python bench/drm_cost.py [--depth 8] [--resolution 256] [--candidates 2] [--dtype fp32] [--comfyui PATH]

SD3.5-Medium's size, K = 1, 2 and 4 candidates at 1024x1024 (74 minutes on a 2-core CPU; on a large GPU
add more, e.g. --candidates 1,4,16,64: a K that does not fit stops the bench with an out-of-memory error):

    python bench/drm_cost.py --depth 24 --resolution 1024 --dtype bf16 --candidates 1,2,4 --repeats 3

The tiny default shows the pipeline; its ratios are dominated by the heads and hooks, not the blocks.

All models are random-weight SD3.5-architecture MMDiTs (depth 24 is SD3.5-M: hidden 1536, 24 heads, x-block
self-attention in the first 13 blocks). Both DRMs run on the generator's own blocks, as an adapter DRM or an
imported DiNa-LRM does (a `full` DRM's own copy computes the same):
- the paper's (ConvGN head) keeps depth - 3 blocks, as the 2BConvGN variant does: expected ratio about
  (depth - 3) / depth, plus the final layer and head;
- DiNa-LRM's keeps depth / 2 blocks, as the released 12-of-24 model does, with its rank-64 LoRA and its
  query-attention head on the image and text tokens after blocks depth/6, depth/3 and depth/2: about 1/2.
Each is called with K latents (the K candidates of one step-wise search step) and 154 context tokens (SD3.5's
77 CLIP + 77 T5 in ComfyUI).

Peak memory is what one call allocates above the weights and inputs: on a GPU, torch.cuda.max_memory_allocated;
on the CPU, the most tensor storage alive at once, counted op by op (a kernel's private workspace and the
allocator's overhead are not included). From the largest K's figure the bench estimates how many candidates fit in one call in the
memory free now; drm.runtime splits a batch that does not fit in halves, after the out-of-memory error.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.measure import GiB, TensorMemory, peak_bytes, timed  # noqa: E402, F401 (TensorMemory: tests/unit)

CONTEXT_TOKENS = 154


def candidate_counts(text: str) -> list[int]:
    try:
        counts = sorted({int(k) for k in text.split(",")})
    except ValueError:
        counts = []
    if not counts or counts[0] < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected candidate counts of at least 1, comma-separated, "
                                         "e.g. 1,2,4")
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depth", type=int, default=8, help="joint blocks of the generator (24: SD3.5-M)")
    parser.add_argument("--skip", type=int, default=3, help="blocks the paper's DRM leaves out (default 3)")
    parser.add_argument("--resolution", type=int, default=256, help="image pixels (latent = resolution / 8)")
    parser.add_argument("--candidates", type=candidate_counts, default=[2],
                        help="latents per call, comma-separated (default 2)")
    parser.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    parser.add_argument("--repeats", type=int, default=10, help="timed calls per model and K (default 10)")
    parser.add_argument("--comfyui", help="ComfyUI tree (default: $COMFYUI_PATH)")
    args = parser.parse_args()
    if args.depth < 2 or not 0 < args.skip < args.depth:
        parser.error(f"--depth {args.depth} --skip {args.skip}: expected depth >= 2 and 0 < skip < depth; "
                     f"pass a --skip below --depth (default 3), or --depth 4 or more")
    if args.resolution < 16 or args.resolution % 16:
        parser.error(f"--resolution {args.resolution}: expected a positive multiple of 16 (the MMDiT's 2x2 "
                     "latent patches), e.g. 256")
    if args.repeats < 1:
        parser.error(f"--repeats {args.repeats}: expected at least 1 timed call per model and K")

    from drm.host import import_comfy_or_exit

    import_comfy_or_exit(args.comfyui)
    import comfy.ldm.modules.attention
    import comfy.model_management
    from comfy.ldm.modules.diffusionmodules.mmdit import MMDiT

    from drm.lora import LoRA, target_paths
    from drm.model import DRM, new_final_layer, new_head
    from drm.runtime import WEIGHT_DTYPES
    from trainer.demo.tiny import POS_EMBED_MAX, init_random_, tiny_conditioning, tiny_generator_config

    dtype = WEIGHT_DTYPES[args.dtype]
    device = comfy.model_management.get_torch_device()
    config = tiny_generator_config(args.depth, pos_embed_max=max(POS_EMBED_MAX, args.resolution // 16))
    # Plain torch layers, allocated once (ComfyUI's ops would skip initialisation, or the weights, under Dynamic VRAM).
    generator = MMDiT(**config, operations=torch.nn, dtype=dtype, device="meta").to_empty(device=device)
    init_random_(generator)

    blocks = args.depth - args.skip
    paper_drm = DRM(generator, blocks, new_final_layer(generator, dtype, device, torch.nn),
                    new_head(None, generator, torch.float32, device, torch.nn), shared_backbone=True)
    dina_blocks = args.depth // 2
    taps = tuple(sorted({max(1, dina_blocks // 3), max(1, 2 * dina_blocks // 3), dina_blocks}))
    lora = LoRA.for_module(generator, target_paths(generator, blocks=dina_blocks + 1), rank=64, alpha=128).to(device, dtype)
    dina_head = new_head({"kind": "dina", "image_taps": taps, "text_taps": taps}, generator, torch.float32, device)
    dina = DRM(generator, dina_blocks, None, dina_head, lora=lora, shared_backbone=True)
    for module in (generator, paper_drm, dina):
        module.requires_grad_(False).eval()

    attention = comfy.ldm.modules.attention.optimized_attention.__name__
    print(f"device {device}, {args.dtype}, depth {args.depth} (hidden {generator.hidden_size}), "
          f"{args.resolution}x{args.resolution}, attention {attention}, {args.repeats} interleaved repeats")
    print(f"DRM (ConvGN): {blocks} blocks; DiNa-LRM: {dina_blocks} blocks, taps {list(taps)}, rank-64 LoRA")
    print(f"{'K':>3} {'model':14} {'ms / call':>10} {'ms / latent':>12} {'x generator':>12} {'peak GiB':>9}")
    for k in args.candidates:
        latent = args.resolution // 8
        x = torch.randn(k, 16, latent, latent, device=device, dtype=dtype)
        t = torch.full((k,), 500.0, device=device)  # float32, as ComfyUI passes timesteps
        cond = tiny_conditioning(batch=k, tokens=CONTEXT_TOKENS)
        context, pooled = cond[0][0].to(device, dtype), cond[0][1]["pooled_output"].to(device, dtype)
        calls = {
            "generator": functools.partial(generator, x, t, context=context, y=pooled),
            "DRM (ConvGN)": functools.partial(paper_drm, x, t, context, pooled),
            "DiNa-LRM": functools.partial(dina, x, t, context, pooled),
        }
        with torch.no_grad():
            peak = {name: peak_bytes(fn) for name, fn in calls.items()}  # also the warm-up
            times = {name: [] for name in calls}
            for _ in range(args.repeats):  # interleaved, so drift on a shared machine hits all alike
                for name, fn in calls.items():
                    times[name].append(timed(fn))
        median = {name: statistics.median(seconds) for name, seconds in times.items()}
        for name in calls:
            print(f"{k:>3} {name:14} {median[name] * 1e3:10.1f} {median[name] * 1e3 / k:12.1f} "
                  f"{median[name] / median['generator']:12.3f} {peak[name] / GiB:9.3f}")

    print(f"expected x generator: DRM (ConvGN) about {blocks / args.depth:.3f} plus the head, "
          f"DiNa-LRM about {dina_blocks / args.depth:.3f} plus the LoRA and the head")
    free = comfy.model_management.get_free_memory(device)
    per_latent = {name: bytes_ / args.candidates[-1] for name, bytes_ in peak.items()}  # at the largest K
    fits = {name: int(free // per) if per else None for name, per in per_latent.items()}
    print(f"free {'GPU ' if device.type == 'cuda' else ''}memory now {free / GiB:.1f} GiB; at "
          f"{per_latent['DiNa-LRM'] / GiB:.3f} GiB per latent (K = {args.candidates[-1]}) about {fits['DiNa-LRM']} "
          f"DiNa-LRM candidates fit in one call, and {fits['DRM (ConvGN)']} for the paper's DRM. drm.runtime "
          "scores a batch that does not fit in halves.")


if __name__ == "__main__":
    main()
