"""Command line: `python -m trainer <command> --help`.

  demo   the pipeline end to end on a tiny random-weight SD3.5-architecture model
  drm    train a DRM from preference pairs
  grpo   fine-tune SD3.5 into a LoRA with Step-wise GRPO (or the GRPO baseline) against a DRM
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .config import ConfigError, add_arguments, load_config
from .drm_train import DRMTrainConfig
from .grpo_train import GRPOConfig

CONFIGS = {"drm": DRMTrainConfig, "grpo": GRPOConfig}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--comfyui", metavar="PATH",
                        help="ComfyUI tree to use (default: $COMFYUI_PATH, then the ComfyUI holding this pack)")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="run the pipeline on a tiny random-weight SD3.5-architecture model")
    demo.add_argument("--out", default="runs/demo", help="output folder (default runs/demo; an earlier demo there is replaced)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--install", action="store_true",
                      help="copy the tiny model, VAE, DRM, LoRA and prompts into ComfyUI's models folder")
    add_arguments(commands.add_parser("drm", help="train a DRM from preference pairs"), DRMTrainConfig)
    add_arguments(commands.add_parser("grpo", help="Step-GRPO / GRPO fine-tuning to a ComfyUI LoRA"), GRPOConfig)
    args = parser.parse_args(argv)

    try:  # configuration errors are reported before any model loads
        config = load_config(CONFIGS[args.command], args) if args.command in CONFIGS else None
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    from drm.host import ComfyUIUnavailable, import_comfy

    try:
        import_comfy(args.comfyui)
    except ComfyUIUnavailable as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from .runs import RunInterrupted

    if args.command == "demo":
        from .demo import run_demo

        try:
            import folder_paths

            run_demo(out=args.out, seed=args.seed,
                     install_into=Path(folder_paths.models_dir) if args.install else None)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        except RunInterrupted as e:
            print(f"stopped: {e}", file=sys.stderr)
            return 130
    else:
        from .drm_train import train_drm
        from .grpo_train import train_grpo

        try:
            (train_drm if args.command == "drm" else train_grpo)(config)
        except ValueError as e:  # bad data or models: a clear message, nothing half-written
            print(f"error: {e}", file=sys.stderr)
            return 2
        except RunInterrupted:  # its message is printed; the checkpoint makes --resume continue exactly
            return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
