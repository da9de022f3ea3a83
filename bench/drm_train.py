"""DRM training cost, adapter against full, side by side in one run.

    python bench/drm_train.py [--depth 4] [--resolution 256] [--steps 6] [--comfyui PATH]

Prints training pairs per second for `adapter` and `full` mode on a random-weight SD3.5-architecture
model of the given depth, and the DRM's extra parameter bytes at inference (what it adds beside the
generator) for both, at that depth and at SD3.5-Medium's size (computed on the meta device, no
memory needed). Target: the adapter's extra memory at SD3.5-M size is under 5% of the backbone.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def extra_bytes(depth: int, rank: int, bytes_per_weight: int = 2) -> tuple[int, int, int]:
    """(backbone, adapter extra, full extra) parameter bytes for a DRM keeping depth - 3 blocks."""
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.mmdit import MMDiT

    from drm.checkpoint import keep_blocks
    from drm.head import ConvGNHead
    from drm.lora import target_paths
    from trainer.demo.tiny import tiny_generator_config

    with torch.device("meta"):
        config = tiny_generator_config(depth)
        config["pos_embed_max_size"], config["num_patches"] = 384, 384 ** 2  # SD3.5-M's position table
        backbone = MMDiT(**config, operations=comfy.ops.disable_weight_init)
        head = ConvGNHead(16)
    blocks = depth - 3
    count = lambda params: sum(p.numel() for p in params)  # noqa: E731
    backbone_n = count(backbone.parameters()) + backbone.pos_embed.numel()
    final_n = count(backbone.final_layer.parameters())
    lora_n = sum(rank * sum(backbone.get_submodule(p).weight.shape) for p in target_paths(backbone, False, blocks))
    kept = keep_blocks(dict(backbone.named_parameters()), blocks).values()
    full_n = count(kept) + backbone.pos_embed.numel() + count(head.parameters())
    adapter_n = lora_n + final_n + count(head.parameters())
    return backbone_n * bytes_per_weight, adapter_n * bytes_per_weight, full_n * bytes_per_weight


def training_seconds(mode: str, base: Path, data: Path, steps: int, batch: int) -> float:
    """Wall time of one whole `trainer drm` run (loading, steps, final eval, files)."""
    from trainer.reward.config import DRMTrainConfig
    from trainer.reward.train import train_drm

    with tempfile.TemporaryDirectory() as out:
        cfg = DRMTrainConfig(base=str(base), data=str(data), out=out, mode=mode, max_steps=steps, batch_size=batch,
                             precision="bf16" if torch.cuda.is_available() else "fp32", eval_every=10**6,
                             save_every=10**6, log_every=10**6)
        cfg.validate()
        start = time.perf_counter()
        train_drm(cfg)
        return time.perf_counter() - start


def pairs_per_second(mode: str, base: Path, data: Path, steps: int, batch: int) -> float:
    """Training throughput alone: runs of `steps` and 2 * `steps` differ only by `steps` training steps,
    so their time difference leaves out loading, the final evaluation and writing files."""
    short, long = (training_seconds(mode, base, data, n, batch) for n in (steps, 2 * steps))
    return steps * batch / (long - short)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--comfyui", help="ComfyUI tree (default: $COMFYUI_PATH)")
    args = parser.parse_args()

    from drm.host import import_comfy_or_exit

    import_comfy_or_exit(args.comfyui)
    from drm.files import atomic_save
    from trainer.demo.synthetic import synthetic_latent_pairs
    from trainer.demo.tiny import tiny_generator_state_dict

    with tempfile.TemporaryDirectory() as tmp:
        base, data = Path(tmp) / "base.safetensors", Path(tmp) / "pairs.safetensors"
        atomic_save(tiny_generator_state_dict(depth=args.depth), base, {})
        synthetic_latent_pairs(64, size=args.resolution // 8).save(data)
        training_seconds("adapter", base, data, 1, args.batch)  # warm-up
        # interleaved, so drift on a shared machine hits both modes alike
        speed = {"adapter": [], "full": []}
        for _ in range(2):
            for mode in speed:
                speed[mode].append(pairs_per_second(mode, base, data, args.steps, args.batch))
    adapter, full = max(speed["adapter"]), max(speed["full"])
    print(f"depth {args.depth}, {args.resolution}x{args.resolution}, batch {args.batch}, {args.steps} steps, "
          f"{'cuda' if torch.cuda.is_available() else 'cpu'}")
    print(f"training pairs/s: adapter {adapter:.2f}, full {full:.2f}, adapter/full {adapter / full:.2f}")
    for depth, label in ((args.depth, f"depth {args.depth}"), (24, "SD3.5-M size (depth 24)")):
        backbone, extra_adapter, extra_full = extra_bytes(depth, args.rank)
        print(f"{label}: backbone {backbone / 2**20:.1f} MiB (bf16); DRM extra at inference: adapter "
              f"{extra_adapter / 2**20:.1f} MiB ({100 * extra_adapter / backbone:.2f}% of the backbone), "
              f"full {extra_full / 2**20:.1f} MiB ({100 * extra_full / backbone:.1f}%)")


if __name__ == "__main__":
    main()
